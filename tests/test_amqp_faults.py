"""The AMQP listener against faults: the database away under a C2D send, and peers that break the protocol's
bookkeeping (begins on a channel in use, links attached and never detached, put-tokens without credit for the answer).

Each must end in a clear refusal — an AMQP error with its condition and description, or a close with one — with no
traceback in the log and state bounded per connection. The clients are proton's own (``tests.test_amqp.Amqp``) or
raw frames over TLS (``tests.test_amqp._raw_amqp``), not opendps code. One server for the module (SQLite: a write lock
held by another connection makes the store unavailable, as a stopped PostgreSQL does — ``store.unavailable``).
"""

from __future__ import annotations

import sqlite3
import ssl
import time

import pytest
from proton import Delivery, Message, uint, ulong
from tests.test_amqp import (
    ATTACH,
    BEGIN,
    FLOW,
    SAS_TYPE,
    Amqp,
    _attach,
    _frames,
    _perf,
    _raw_amqp,
    _server_log,
    _transfer,
    c2d,
    hub_owner_token,
    queued,
    sas_device,
)

SERVER_STORES = ("sqlite",)  # the listener is the subject; the SQLite file is what a test can lock
SERVER_ARGS = ("--sqlite-busy-timeout", "2")  # a locked file is an outage after 2 s, not the default 10

pytestmark = pytest.mark.timeout(300, func_only=True)
DETACH, CLOSE = 0x16, 0x18
MAX_LINKS = 32  # AmqpLimits.max_links: links served at once per connection


def _begin(channel: int = 0) -> bytes:
    return _perf(BEGIN, [None, uint(0), uint(1000), uint(1000)], channel=channel)


def _closes(frames: list[tuple[int, list]]) -> list[str]:
    return [str(fields) for code, fields in frames if code == CLOSE]


def test_a_database_outage_under_a_c2d_send_is_refused_with_the_condition_the_sdks_retry(server):
    """The store unavailable (SQLite write-locked past its busy timeout) was sent as ``amqp:internal-error``, which the
    Node and C# service clients treat as permanent. Now ``com.microsoft:timeout`` — Node's ServiceUnavailableError,
    C#'s transient timeout, retried by uamqp — with the reason; the same link sends once the store is back."""
    sas_device(server, "amqp-outage-dev")
    path = server.db_url.split("///", 1)[1]
    client = Amqp(server, timeout=60)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        before = len(_server_log(server))
        lock = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the write lock: the queue's insert waits out the busy timeout, then fails
            state, cond, description = client.send(sender, c2d("amqp-outage-dev", b"while away"))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert (state, cond) == (Delivery.REJECTED, "com.microsoft:timeout"), description
        assert "database is unavailable" in description and "503" in description, description
        assert client.send(sender, c2d("amqp-outage-dev", b"back"))[:2] == (Delivery.ACCEPTED, None)
    finally:
        client.close()
    assert [r.body for r in queued(server, "amqp-outage-dev")] == [b"back"]
    log = _server_log(server)[before:]
    assert "Traceback" not in log and "the database is unavailable" in log, log[-3000:]


def test_begins_on_a_channel_in_use_close_the_connection(server):
    """Proton takes a begin on a channel already in use as one more session, each kept and unreachable: 10,000 begins
    on channel 0 held 36 MB, and once proton's own channels ran out the connection wedged (no close, the socket left
    in CLOSE-WAIT until the idle timeout) with proton's errors on stderr. Now the connection closes with
    ``amqp:not-allowed`` past 8 sessions, and a good client is served meanwhile."""
    before = len(_server_log(server))
    with _raw_amqp(server) as s:
        s.sendall(b"".join(_begin(0) for _ in range(2000)))
        frames = _frames(s, 5)
    closes = _closes(frames)
    assert closes and "amqp:not-allowed" in closes[0] and "sessions" in closes[0], frames[-3:]
    assert len([f for code, f in frames if code == BEGIN]) <= 8, len(frames)
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
    finally:
        client.close()
    log = _server_log(server)[before:]
    assert "Traceback" not in log and "process error" not in log and "unable to find" not in log, log[-3000:]


@pytest.mark.parametrize("case", ["refused-nodes", "handle-in-use", "past-the-link-limit"])
def test_links_the_peer_never_detaches_are_bounded(server, case):
    """Links refused (attached, then detached with an error) stay in proton until the peer detaches them too; a peer
    that never does, or attaches again on a handle in use (orphaning the first link for good), or past the 32 links
    served (each refused with resource-limit-exceeded), piled them up: 10,000 on one connection held 29 MB and wrote a
    log line each. Now the connection closes with ``amqp:resource-limit-exceeded`` once 64 are held."""
    before = len(_server_log(server))
    with _raw_amqp(server) as s:
        s.sendall(_begin(0))
        _frames(s, 0.5)
        frames: list[tuple[int, list]] = []
        for batch in range(20):  # 10,000 attaches, or fewer once the server closes
            try:
                s.sendall(b"".join(
                    _attach(f"{case}-{batch}-{n}", 0 if case == "handle-in-use" else batch * 500 + n, False, "me",
                            "$cbs" if case == "past-the-link-limit" else "/nowhere")
                    for n in range(500)))
            except (OSError, ssl.SSLError):
                break
            frames += _frames(s, 0.3)
            if _closes(frames):
                break
        frames += _frames(s, 3)
    closes = _closes(frames)
    assert closes and "amqp:resource-limit-exceeded" in closes[0] and "links" in closes[0], frames[-3:]
    assert len([f for code, f in frames if code == ATTACH]) <= 2 * MAX_LINKS + 1, len(frames)
    log = _server_log(server)[before:]
    assert "Traceback" not in log and len(log.splitlines()) < 4 * MAX_LINKS, log[-3000:]


def test_cbs_answers_without_credit_are_bounded(server):
    """A peer that sends put-tokens but grants no credit on the link the answers go back on: each answer waited in the
    link's queue, without bound. Now the answer link is detached with ``amqp:resource-limit-exceeded`` at 64."""
    token = hub_owner_token(server)
    before = len(_server_log(server))
    with _raw_amqp(server) as s:
        s.sendall(_begin(0) + _attach("cbs-send", 0, False, "me", "$cbs") + _attach("cbs-answer", 1, True, "$cbs", "me"))
        _frames(s, 1)
        detached, sent = [], 0
        while not detached and sent < 400:  # ten at a time: the request link's credit, refilled as each is handled
            s.sendall(b"".join(_transfer(0, sent + n, Message(id=ulong(sent + n), body=token, properties={
                "operation": "put-token", "type": SAS_TYPE, "name": "x"}).encode()) for n in range(10)))
            sent += 10
            frames = _frames(s, 0.5)
            detached = [str(f) for code, f in frames if code == DETACH and f[0] == uint(1)]
        assert detached and "amqp:resource-limit-exceeded" in detached[0], (sent, frames[-3:])
        assert sent <= 200, sent
        # the request link still works: with credit granted on a new answer link, a put-token is answered
        s.sendall(_attach("cbs-answer-2", 2, True, "$cbs", "me2")
                  + _perf(FLOW, [uint(0), uint(1000), uint(0), uint(1000), uint(2), uint(0), uint(10)]))
        _frames(s, 0.5)
        s.sendall(_transfer(0, sent, Message(id=ulong(99999), reply_to="me2", body=token, properties={
            "operation": "put-token", "type": SAS_TYPE, "name": "x"}).encode()))
        frames = _frames(s, 3)
    assert any(code == 0x14 for code, _ in frames), frames
    log = _server_log(server)[before:]
    assert "Traceback" not in log, log[-3000:]


def test_the_listener_serves_after_the_faults(server):
    """After every fault above, a well-behaved client still sends."""
    sas_device(server, "amqp-after-faults-dev")
    client = Amqp(server)
    started = time.monotonic()
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        assert client.send(client.devicebound(), c2d("amqp-after-faults-dev"))[:2] == (Delivery.ACCEPTED, None)
    finally:
        client.close()
    assert time.monotonic() - started < 60
