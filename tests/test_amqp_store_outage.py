"""The database stops under the AMQP listener (a throwaway PostgreSQL cluster, stopped and started): a CBS put-token
and a SASL PLAIN credential that cannot be judged for now are answered as transient — status 503, SASL outcome
``sys-temp`` — not as a bad credential or a closed connection with a traceback; a C2D send is rejected with
``com.microsoft:timeout`` (the condition the service SDKs retry); all of it works again once the database is back.
Unlike a write-locked SQLite file (tests/test_amqp_faults.py), a stopped server refuses reads too, which the token
check needs.
"""

from __future__ import annotations

import time

import pytest
from proton import Delivery, symbol
from tests.conftest import _run_server
from tests.test_amqp import (
    C_SDK_USER,
    Amqp,
    _plain_init,
    _read,
    _read_sasl_frame,
    _sasl_frame,
    _server_log,
    _tls,
    c2d,
    hub_owner_token,
    sas_device,
)
from tests.test_store_outage import cluster  # noqa: F401 - the module's PostgreSQL of its own, a fixture

pytestmark = pytest.mark.timeout(300, func_only=True)
SASL_SYS_TEMP = 4  # sasl-outcome code: a transient system error (AMQP 1.0 part 5.3.3.6)


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):  # noqa: F811 - the cluster fixture above
    yield from _run_server(cluster.url, tmp_path_factory.mktemp("amqp-outage"), extra_args=("--workers", "1"))


def _sasl_plain_outcome(server, token: str) -> int:
    """The sasl-outcome code a SASL PLAIN client gets for ``token``, read off the wire."""
    with _tls(server) as s:
        s.sendall(b"AMQP\x03\x01\x00\x00")
        assert _read(s, 8) == b"AMQP\x03\x01\x00\x00"
        code, fields = _read_sasl_frame(s)
        assert code == 0x40 and symbol("PLAIN") in list(fields[0].elements)
        s.sendall(_sasl_frame(0x41, _plain_init(C_SDK_USER, token)))
        code, fields = _read_sasl_frame(s)
        assert code == 0x44
        return int(fields[0])


def test_tokens_and_c2d_during_a_database_outage_are_refused_as_transient(server, cluster):  # noqa: F811
    sas_device(server, "amqp-pg-outage-dev")
    token = hub_owner_token(server)  # the CLI reads the installation from the database: made while it is there
    sending = Amqp(server, timeout=60)
    try:
        assert sending.put_token(token)[0] == 200
        sender = sending.devicebound()
        before = len(_server_log(server))
        cluster.stop()
        try:
            state, cond, description = sending.send(sender, c2d("amqp-pg-outage-dev", b"while away"))
            assert (state, cond) == (Delivery.REJECTED, "com.microsoft:timeout"), description
            # a put-token was an unhandled error that closed the connection (internal-error, a traceback)
            client = Amqp(server, timeout=60)
            try:
                status, description = client.put_token(token)
                assert status == 503 and "database" in description, (status, description)
            finally:
                client.close()
            # SASL PLAIN was refused with 'auth' (a bad credential, which the C SDK does not retry) and a traceback
            assert _sasl_plain_outcome(server, token) == SASL_SYS_TEMP
        finally:
            cluster.start()
        deadline = time.monotonic() + 30  # the pool reconnects by itself
        while True:
            state, cond, description = sending.send(sender, c2d("amqp-pg-outage-dev", b"back"))
            if state == Delivery.ACCEPTED or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert (state, cond) == (Delivery.ACCEPTED, None), description
    finally:
        sending.close()
    assert _sasl_plain_outcome(server, token) == 0
    client = Amqp(server)
    try:
        assert client.put_token(token)[0] == 200
    finally:
        client.close()
    log = _server_log(server)[before:]
    assert "Traceback" not in log and "AMQP handler failed" not in log, log[-3000:]
