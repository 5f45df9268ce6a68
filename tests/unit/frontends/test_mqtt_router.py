"""The MQTT CONNECT router, in-process: which CONNECTs open a DPS session (issue 12: an unauthenticated CONNECT
must never open, or take over, a registration's session)."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import TEST_ID_SCOPE
from tests.unit.conftest import device_sas, new_key, symmetric_group

from opendps.frontends.mqtt.dps import DpsSession
from opendps.frontends.mqtt.router import BAD_CREDENTIALS, IDENTIFIER_REJECTED, NOT_AUTHORIZED, make_router
from opendps.frontends.runtime import Runtime
from opendps.transport.mqtt.server import ConnectRequest
from opendps.transport.sas import derive_device_key


def _connect(services, rid: str, password: str | None, *, client_id: str | None = None, scope: str = TEST_ID_SCOPE):
    runtime = Runtime(services)
    request = ConnectRequest(client_id=rid if client_id is None else client_id,
                             username=f"{scope}/registrations/{rid}/api-version=2025-07-01-preview",
                             password=password.encode() if password is not None else None, clean_session=True,
                             keepalive=60, peer_certificate_chain=[], peername=("127.0.0.1", 1))
    try:
        return asyncio.run(make_router(runtime)(request))
    finally:
        runtime.domain.close()


@pytest.fixture
def group_key(services):
    return symmetric_group(services, "mqtt-group")


def test_a_proven_credential_opens_a_dps_session(services, group_key):
    session = _connect(services, "dev-m1", device_sas("dev-m1", derive_device_key(group_key, "dev-m1")))
    assert isinstance(session, DpsSession) and session.session_key == "dps:dev-m1"


@pytest.mark.parametrize(("password", "code"), [(None, NOT_AUTHORIZED), ("not a token", NOT_AUTHORIZED),
                                                ("wrong key", NOT_AUTHORIZED)])
def test_no_or_a_wrong_credential_is_refused_at_connect(services, group_key, password, code):
    if password == "wrong key":
        password = device_sas("dev-m2", new_key())
    assert _connect(services, "dev-m2", password) == code != BAD_CREDENTIALS


def test_identifiers_and_scope(services, group_key):
    token = device_sas("dev-m3", derive_device_key(group_key, "dev-m3"))
    assert _connect(services, "dev-m3", token, client_id="someone-else") == IDENTIFIER_REJECTED
    assert _connect(services, "dev-m3", token, scope="0ne00OTHER1") == NOT_AUTHORIZED


def test_a_disabled_enrollment_still_connects_and_is_answered_per_request(services, group_key):
    services.enrollments.put("group", "mqtt-group", {"attestation": {"type": "symmetricKey"},
                                                     "provisioningStatus": "disabled"})
    session = _connect(services, "dev-m4", device_sas("dev-m4", derive_device_key(group_key, "dev-m4")))
    assert isinstance(session, DpsSession)


def test_refusal_lines_show_the_peers_values_cut(services, group_key, caplog):
    """A CONNECT's user name is the peer's (up to 64 KiB): the refusal lines show its parts cut, not whole."""
    long = "x" * 20_000
    with caplog.at_level("INFO"):
        assert _connect(services, "dev-m5", None, scope=long) == NOT_AUTHORIZED  # unknown ID scope
        assert _connect(services, long[:120] + "y", "not a token", client_id=long[:120] + "y") == NOT_AUTHORIZED
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("opendps")]
    assert lines and all(len(line) < 600 for line in lines), [len(line) for line in lines]
    assert any("unknown ID scope 'xxx" in line for line in lines)


def test_a_service_away_is_connack_server_unavailable():
    """The database (or an HSM) away: CONNACK 3, which devices retry, not 5 (not authorized), which they may not."""
    from opendps.errors import ServiceUnavailable
    from opendps.frontends.mqtt.router import connack_code

    assert connack_code(ServiceUnavailable("the database is unavailable for now; retry later")) == 3


def test_a_sas_session_closes_when_its_token_lapses_by_the_wall_clock(monkeypatch):
    """A hub SAS session is closed at its token's se + the CONNECT check's skew (as IoT Hub disconnects at expiry);
    the timer is the loop's, so a wall clock stepped back is waited for and any integer se is armed without overflow.
    (The real server closes one: tests/test_mqtt_hub.py.)"""
    from opendps.frontends.mqtt import hub as hub_module
    from opendps.hub import AuthenticatedDevice
    from opendps.transport.sas import DEFAULT_SKEW_SECONDS

    clock = [1_000_000.0]
    monkeypatch.setattr(hub_module.time, "time", lambda: clock[0])
    monkeypatch.setattr(hub_module.HubSession, "expiry_check", 0.05)
    closed: list[str] = []

    class Connection:
        def close(self, reason: str) -> None:
            closed.append(reason)

    def session(se: int | None) -> hub_module.HubSession:
        device = AuthenticatedDevice(1, "default", "localhost", "d", "d", "sas", sas_expiry=se)
        return hub_module.HubSession(None, device, session=Connection())  # type: ignore[arg-type]

    async def scenario() -> None:
        far = session(10**400)  # se is any integer: armed for a later look, no OverflowError
        far._arm_expiry()
        assert far._expiry is not None
        far._expiry.cancel()
        x509 = session(None)  # no token, no timer
        x509._arm_expiry()
        assert x509._expiry is None
        lapsing = session(int(clock[0]) - DEFAULT_SKEW_SECONDS + 1)  # stands for 1 s more
        lapsing._arm_expiry()
        clock[0] -= 3600  # the wall clock stepped back an hour: the timer fires and looks again
        await asyncio.sleep(1.2)
        assert closed == [] and lapsing._expiry is not None
        clock[0] += 3600 + 1.5  # past se + skew by the wall clock
        await asyncio.sleep(0.2)
        assert closed == ["SharedAccessSignature expired: reconnect with a renewed token"]
        assert lapsing._expiry is None

    asyncio.run(scenario())
