"""The device agent (``opendps.device.agent``) against a real ``opendps serve`` (SQLite and PostgreSQL), no mocks.

The server issues real 1-day certificates with its real clock; the agent runs on a :class:`FakeClock`
the test moves (its ``sleep`` waits for the test to move time past the deadline), so "19 hours later"
takes milliseconds. Times are computed from the issued notBefore, and jitter from a seeded rng.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from tests.conftest import free_ports
from tests.test_device_api import make_ca, namespace, put, svc
from tests.test_mqtt_hub import events

from opendps.device import agent as agent_module
from opendps.device.agent import AgentConfig, AgentStatus, DeviceAgent, renewal_due_time
from opendps.device.hub import HubClient, HubError
from opendps.device.keys import certificate_summary
from opendps.device.mqtt import ConnectionLost
from opendps.device.provisioning import ProvisioningClient
from opendps.device.store import CertificateStore

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(120, func_only=True)
HUB = "localhost"
FAST = {"min_wait": 0.0, "max_wait": 0.05}
DAY = timedelta(days=1)
SEED = 20251101


class FakeClock:
    """``clock()`` and ``sleep()`` for the agent: sleeping waits until :meth:`set` moves time past the deadline."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._waiters: list[tuple[datetime, asyncio.Future]] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Not a coroutine function: the deadline is fixed when the agent calls it, as a real timer's would be (a
        coroutine would compute it at its first step, and a test moving the clock in between put the wake-up out of
        reach: a CI flake)."""
        return self._until(self.now + timedelta(seconds=seconds))

    async def _until(self, deadline: datetime) -> None:
        if deadline <= self.now:
            await asyncio.sleep(0)
            return
        entry = (deadline, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)

    def deadlines(self) -> list[datetime]:
        """When the sleepers wake up (the agent's loop and its telemetry timer)."""
        return sorted(deadline for deadline, _ in self._waiters)

    def set(self, when: datetime) -> None:
        self.now = when
        for deadline, future in list(self._waiters):
            if deadline <= when and not future.done():
                future.set_result(None)


async def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def settle(agent: DeviceAgent, clock: FakeClock) -> None:
    """Wait until the agent's loop has looked at the schedule at the clock's current time."""
    await wait_for(lambda: agent.status.last_check == clock.now and agent.status.state == "connected")


def enroll(server, tmp: str, *, days: int = 1) -> tuple[str, dict]:
    """Namespace + policy (``days`` validity) and an individual symmetric-key enrollment linked to it."""
    with svc(server) as c:
        namespace(c, f"{tmp}-ns", f"{tmp}-p", days=days)
        doc = put(c, f"/enrollments/{tmp}-dev", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": f"{tmp}-p"})
    return f"{tmp}-dev", doc


def update_enrollment(server, rid: str, doc: dict, **changes) -> None:
    """PUT the enrollment again with the same keys; ``None`` drops a field."""
    body = {"attestation": doc["attestation"], "credentialPolicyName": doc["credentialPolicyName"],
            "provisioningStatus": "enabled"}
    body.update(changes)
    with svc(server) as c:
        put(c, f"/enrollments/{rid}", {k: v for k, v in body.items() if v is not None}, status=200)


def config(server, tmp_path: Path, rid: str, doc: dict, **overrides) -> AgentConfig:
    options = {"dps_host": HUB, "id_scope": server.id_scope, "registration_id": rid, "store_dir": tmp_path / "creds",
               "https_port": int(server.url.rsplit(":", 1)[1]), "mqtt_port": server.mqtt_port, "ca_file": server.ca_file,
               "symmetric_key": doc["attestation"]["symmetricKey"]["primaryKey"], "provisioning_options": FAST,
               "hub_options": {"backoff_base": 0.05, "backoff_max": 0.2}, "retry_base": 300.0, "retry_max": 3600.0}
    options.update(overrides)
    return AgentConfig(**options)


def reported_certificate(server, device_id: str) -> dict:
    with svc(server) as c:
        return c.get(f"/twins/{device_id}").json()["properties"]["reported"].get("certificate")


def public_key(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def first_renewal_time(cert: x509.Certificate, rng: random.Random) -> datetime:
    """The agent's schedule for a certificate issued while the device clock agreed with the server: 80 % - jitter."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + lifetime * 0.8 - lifetime * 0.1 * rng.random()


# ---------------------------------------------------------------- no server
def test_renewal_threshold_and_config_validation(tmp_path):
    start = datetime(2026, 1, 1, tzinfo=UTC)

    class Cert:  # renewal_due_time reads only the validity
        def __init__(self, days: float) -> None:
            self.not_valid_before_utc, self.not_valid_after_utc = start, start + timedelta(days=days)

    due = {days: renewal_due_time(Cert(days)) - start for days in (1, 10, 14, 30, 90)}  # type: ignore[arg-type]
    # 1 day: 80 % = 19.2 h; 7 days before expiry once the certificate lives >= 14 days; never after 80 %
    assert due == {1: timedelta(hours=19, minutes=12), 10: timedelta(days=8), 14: timedelta(days=7),
                   30: timedelta(days=23), 90: timedelta(days=72)}
    base = {"dps_host": "h", "id_scope": "s", "registration_id": "r", "store_dir": tmp_path}
    with pytest.raises(ValueError, match="exactly one onboarding credential"):
        AgentConfig(**base, symmetric_key="a", group_key="b")
    with pytest.raises(ValueError, match="both x509_cert_file and x509_key_file"):
        AgentConfig(**base, x509_cert_file="boot.pem")
    with pytest.raises(ValueError, match="renewal_method"):
        AgentConfig(**base, symmetric_key="a", renewal_method="email")  # type: ignore[arg-type]
    status = AgentStatus("r", "dps", next_renewal=start)
    assert status.to_dict()["next_renewal"] == "2026-01-01T00:00:00Z" and status.to_dict()["last_error"] is None


# ---------------------------------------------------------------- against the server
def test_dps_renewal_at_80_percent_switches_live_without_losing_telemetry(server, tmp_path):
    rid, doc = enroll(server, "agent-dps")
    clock = FakeClock(datetime.now(UTC))
    seen: list[str] = []
    pending: list[asyncio.Future] = []
    agent: DeviceAgent

    def on_event(event: str, status: AgentStatus, details: dict) -> None:
        seen.append(event)
        if event == "switching":  # messages queued while the connection moves to the new certificate
            pending.extend(agent.queue_telemetry({"n": n}, message_id=f"switch-{n}") for n in range(3))

    async def scenario() -> tuple[x509.Certificate, x509.Certificate]:
        nonlocal agent
        agent = DeviceAgent(config(server, tmp_path, rid, doc, telemetry_interval=600), clock=clock, sleep=clock.sleep,
                            rng=random.Random(SEED), on_event=on_event)
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        expected_rng = random.Random(SEED)
        first = agent.credentials.certificate
        assert first.not_valid_after_utc - first.not_valid_before_utc == DAY
        assert agent.store.current().certificate == first and not agent.store.pending
        renew_at = first_renewal_time(first, expected_rng)
        status = agent.status
        assert (status.state, status.connected, status.device_id, status.next_renewal) == ("connected", True, rid, renew_at)
        assert reported_certificate(server, rid) == certificate_summary(first) == status.certificate
        pending.extend(agent.queue_telemetry({"n": n}, message_id=f"before-{n}") for n in range(3))

        for when in (first.not_valid_before_utc + DAY / 2, renew_at - timedelta(seconds=1)):  # 50 %, just before
            clock.set(when)
            await settle(agent, clock)
            assert agent.status.renewals == 0 and agent.store.current().certificate == first
        pending.append(agent.queue_telemetry({"n": 3}, message_id="before-3"))

        clock.set(renew_at)
        await wait_for(lambda: agent.status.renewals == 1 and agent.status.state == "connected")
        new = agent.credentials.certificate
        assert new.serial_number != first.serial_number and public_key(new) != public_key(first)
        assert agent.store.current().certificate == new and not agent.store.pending
        assert agent.hub.connected
        status = agent.status
        assert (status.last_renewal, status.failures, status.last_error, status.certificate) == (
            renew_at, 0, None, certificate_summary(new))
        # the device clock is ~19 h ahead of the issuer now: the next renewal is ~80 % of a day away, not "due"
        lifetime = new.not_valid_after_utc - new.not_valid_before_utc
        assert status.next_renewal == (new.not_valid_before_utc + lifetime * 0.8 - lifetime * 0.1 * expected_rng.random()
                                       + (renew_at - new.not_valid_before_utc))
        await settle(agent, clock)
        assert agent.status.renewals == 1
        pending.extend(agent.queue_telemetry({"n": n}, message_id=f"after-{n}") for n in range(2))
        await asyncio.wait_for(asyncio.gather(*pending), 15)
        reported = reported_certificate(server, rid)
        assert reported["serialNumber"] == f"{new.serial_number:X}"
        assert reported["validUntil"] == new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert reported == certificate_summary(new)
        await agent.stop()
        await asyncio.wait_for(task, 10)
        assert agent.status.state == "stopped" and not agent.status.connected
        return first, new

    first, new = asyncio.run(scenario())
    assert seen == ["provisioned", "connected", "switching", "renewed"]
    got = events(server, rid, 100, timeout=1)
    ids = [e["event"]["properties"]["system"]["message-id"] for e in got]
    explicit = [i for i in ids if not i.startswith(rid)]
    expected = [f"before-{n}" for n in range(4)] + [f"switch-{n}" for n in range(3)] + [f"after-{n}" for n in range(2)]
    assert sorted(set(explicit)) == sorted(expected), ids  # none missing (delivery is at least once)
    assert [i for i in dict.fromkeys(explicit)] == expected  # and in the order they were queued
    periodic = [int(i.rsplit("-", 1)[1]) for i in dict.fromkeys(ids) if i.startswith(rid)]
    assert periodic and periodic == list(range(1, len(periodic) + 1))  # the interval telemetry: a gap-free sequence
    with svc(server) as c:
        record = c.get(f"/namespaces/agent-dps-ns/devices/{rid}").json()["properties"]["operationalCertificate"]
    assert int(record["serialNumber"], 16) == new.serial_number != first.serial_number


def test_hub_topic_renewal_and_renew_now(server, tmp_path, monkeypatch):
    rid, doc = enroll(server, "agent-hub")
    registrations: list[str] = []
    real_register = ProvisioningClient.register

    async def counting_register(self, csr_b64=None, payload=None):
        registrations.append(self.registration_id)
        return await real_register(self, csr_b64, payload)

    monkeypatch.setattr(ProvisioningClient, "register", counting_register)
    clock = FakeClock(datetime.now(UTC))

    async def method(name: str, payload: object) -> tuple[int, dict]:
        return 200, {"echo": payload}

    async def scenario() -> list[x509.Certificate]:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, renewal_method="hub"), clock=clock, sleep=clock.sleep,
                            rng=random.Random(SEED), methods={"ping": method})
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        certs = [agent.credentials.certificate]
        renew_at = first_renewal_time(certs[0], random.Random(SEED))
        clock.set(renew_at - timedelta(seconds=1))
        await settle(agent, clock)
        assert agent.status.renewals == 0
        clock.set(renew_at)
        await wait_for(lambda: agent.status.renewals == 1 and agent.status.state == "connected")
        certs.append(agent.credentials.certificate)
        summary = await asyncio.wait_for(agent.renew_now(), 30)  # forced, long before the next due time
        certs.append(agent.credentials.certificate)
        assert summary == certificate_summary(certs[2]) == reported_certificate(server, rid)
        assert agent.status.renewals == 2 and agent.hub.connected and not agent.store.pending

        def invoke() -> dict:
            with svc(server) as c:
                return c.post(f"/twins/{rid}/methods", json={"methodName": "ping", "payload": [1],
                                                             "responseTimeoutInSeconds": 10}).json()

        assert await asyncio.to_thread(invoke) == {"status": 200, "payload": {"echo": [1]}}  # on the renewed connection
        await agent.stop()
        await task
        return certs

    certs = asyncio.run(scenario())
    assert registrations == [rid]  # onboarding only: both renewals went through $iothub/credentials
    assert len({c.serial_number for c in certs}) == 3 and len({public_key(c) for c in certs}) == 3
    assert all(c.not_valid_after_utc - c.not_valid_before_utc == DAY for c in certs)

    # a restart uses the stored set (no new registration) and reports it
    async def restart() -> x509.Certificate:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, renewal_method="hub"), rng=random.Random(SEED))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        cert = agent.credentials.certificate
        await agent.stop()
        await task
        return cert

    assert asyncio.run(restart()) == certs[2] and registrations == [rid]


def test_dps_renewal_refused_for_a_disabled_enrollment_keeps_the_certificate_and_backs_off(server, tmp_path):
    rid, doc = enroll(server, "agent-off")
    clock = FakeClock(datetime.now(UTC))

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc), clock=clock, sleep=clock.sleep, rng=random.Random(SEED))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        expected_rng = random.Random(SEED)
        first = agent.credentials.certificate
        renew_at = first_renewal_time(first, expected_rng)
        update_enrollment(server, rid, doc, provisioningStatus="disabled")

        clock.set(renew_at)
        await wait_for(lambda: agent.status.failures == 1 and agent.status.state == "connected")
        status = agent.status
        assert status.last_error.startswith("dps renewal failed: ProvisioningError: 403 403003")
        assert "disabled" in status.last_error and status.last_error_at == renew_at
        assert status.renewals == 0 and status.last_renewal is None
        assert status.next_renewal == renew_at + timedelta(seconds=300 * (0.5 + 0.5 * expected_rng.random()))
        assert agent.store.current().certificate == first and not agent.store.pending
        assert agent.credentials.certificate == first and agent.hub.connected and status.connected
        await asyncio.wait_for(agent.queue_telemetry("still connected", message_id="after-403"), 10)
        assert reported_certificate(server, rid)["serialNumber"] == f"{first.serial_number:X}"

        # the second attempt waits twice as long (exponential backoff), then the operator re-enables the device
        retry_at = status.next_renewal
        await wait_for(lambda: retry_at in clock.deadlines())  # the loop sleeps exactly until the retry
        clock.set(retry_at - timedelta(seconds=1))
        await asyncio.sleep(0.1)
        assert agent.status.failures == 1
        clock.set(retry_at)
        await wait_for(lambda: agent.status.failures == 2 and agent.status.state == "connected")
        assert agent.status.next_renewal == retry_at + timedelta(seconds=600 * (0.5 + 0.5 * expected_rng.random()))
        assert agent.store.current().certificate == first
        update_enrollment(server, rid, doc)
        clock.set(agent.status.next_renewal)
        await wait_for(lambda: agent.status.renewals == 1 and agent.status.state == "connected")
        assert agent.status.failures == 0 and agent.credentials.certificate.serial_number != first.serial_number
        assert "403" in agent.status.last_error  # the last error stays visible, with its time
        await agent.stop()
        await task

    asyncio.run(scenario())
    [event] = events(server, rid, 1)
    assert event["event"]["payload"] == "still connected"


def test_hub_renewal_refused_without_a_credential_policy_keeps_the_certificate(server, tmp_path):
    rid, doc = enroll(server, "agent-nopolicy")
    clock = FakeClock(datetime.now(UTC))

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, renewal_method="hub"), clock=clock, sleep=clock.sleep,
                            rng=random.Random(SEED))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        first = agent.credentials.certificate
        update_enrollment(server, rid, doc, credentialPolicyName=None)

        with pytest.raises(HubError) as info:  # forced: the caller (CLI) gets the hub's error
            await asyncio.wait_for(agent.renew_now(), 30)
        assert info.value.status == 400 and info.value.error_code == 400006
        assert "no credential policy" in info.value.message
        status = agent.status
        assert status.failures == 1 and "400 400006" in status.last_error and "no credential policy" in status.last_error
        assert status.next_renewal == first_renewal_time(first, random.Random(SEED))  # a forced failure keeps the plan
        clock.set(status.next_renewal)
        await wait_for(lambda: agent.status.failures == 2 and agent.status.state == "connected")
        assert agent.status.last_error.startswith("hub renewal failed: HubError: 400 400006")
        assert agent.store.current().certificate == first and not agent.store.pending
        assert agent.hub.connected and agent.status.renewals == 0
        await asyncio.wait_for(agent.queue_telemetry("still here", message_id="after-400"), 10)
        await agent.stop()
        await task

    asyncio.run(scenario())
    assert [e["event"]["payload"] for e in events(server, rid, 1)] == ["still here"]


def test_new_certificate_refused_by_the_hub_is_rolled_back(server, tmp_path, monkeypatch):
    """The hub really refuses (CONNACK 5) a certificate it does not trust: the agent goes back to the old set."""
    rid, doc = enroll(server, "agent-rogue")
    rogue = make_ca("agent-rogue-ca")

    async def rogue_renewal(self, csr_b64: str, *, replace: str | None = None) -> list[x509.Certificate]:
        csr = x509.load_der_x509_csr(base64.b64decode(csr_b64))
        now = datetime.now(UTC)
        leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(rogue.cert.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + DAY).sign(rogue.key, hashes.SHA256()))
        return [leaf, rogue.cert, rogue.cert]

    monkeypatch.setattr(HubClient, "renew_certificate", rogue_renewal)  # the issuer lies; the hub is real
    seen: list[str] = []
    pending: list[asyncio.Future] = []
    agent: DeviceAgent

    def on_event(event: str, status: AgentStatus, details: dict) -> None:
        seen.append(event)
        if event == "switching":
            pending.append(agent.queue_telemetry("during the refused switch", message_id="switch-0"))

    async def scenario() -> None:
        nonlocal agent
        agent = DeviceAgent(config(server, tmp_path, rid, doc, renewal_method="hub"), rng=random.Random(SEED),
                            on_event=on_event)
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        first = agent.credentials.certificate
        with pytest.raises(Exception, match=r"refused the renewed certificate \(CONNACK 5\)"):
            await asyncio.wait_for(agent.renew_now(), 30)
        assert agent.store.current().certificate == first == agent.credentials.certificate
        assert not agent.store.pending and agent.hub.connected
        assert agent.status.failures == 1 and "CONNACK 5" in agent.status.last_error and agent.status.renewals == 0
        await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert reported_certificate(server, rid)["serialNumber"] == f"{first.serial_number:X}"
        await agent.stop()
        await task

    asyncio.run(scenario())
    assert seen == ["provisioned", "connected", "switching", "rolled-back", "renewal-failed"]
    assert [e["event"]["payload"] for e in events(server, rid, 1)] == ["during the refused switch"]


def test_module_exports():
    assert set(agent_module.__all__) == {"AgentConfig", "AgentError", "AgentStatus", "DeviceAgent", "renewal_due_time"}


def test_the_agent_answers_methods_and_reports_what_arrives(server, tmp_path):
    """Issue 12.15: methods are answered (built-in and the user's), and C2D, desired patches, a lost connection and
    the reconnect each come out as an event an operator can follow."""
    rid, doc = enroll(server, "agent-traffic")
    seen: list[tuple[str, dict]] = []

    def on_event(event: str, status: AgentStatus, details: dict) -> None:
        seen.append((event, details))

    def invoke(method: str, payload=None) -> dict:
        with svc(server) as c:
            return c.post(f"/twins/{rid}/methods", json={"methodName": method, "payload": payload,
                                                         "responseTimeoutInSeconds": 10}).json()

    def traffic(kind: str) -> list[dict]:
        return [details for event, details in seen if event == kind]

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, renewal_method="hub"), on_event=on_event,
                            methods={"reboot": lambda name, request: (200, {"rebooting": request})})
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        first = agent.credentials.certificate

        status = await asyncio.to_thread(invoke, "getStatus")
        assert status["status"] == 200
        assert status["payload"]["state"] == "connected" and status["payload"]["registration_id"] == rid
        assert await asyncio.to_thread(invoke, "reboot", {"delay": 3}) == {"status": 200,
                                                                           "payload": {"rebooting": {"delay": 3}}}
        unknown = await asyncio.to_thread(invoke, "selfdestruct")
        assert unknown["status"] == 404
        assert "getStatus, reboot, renewCertificate" in unknown["payload"]["message"]

        renewal = await asyncio.to_thread(invoke, "renewCertificate")
        assert renewal["status"] == 202 and renewal["payload"]["certificate"] == certificate_summary(first)
        await wait_for(lambda: any(event == "renewed" for event, _ in seen), 30)
        assert agent.credentials.certificate.serial_number != first.serial_number
        assert reported_certificate(server, rid) == certificate_summary(agent.credentials.certificate)
        assert [(m["method"], m["status"]) for m in traffic("method")] == [
            ("getStatus", 200), ("reboot", 200), ("selfdestruct", 404), ("renewCertificate", 202)]
        assert traffic("method")[1]["request"] == {"delay": 3}

        def send() -> tuple[int, int]:
            with svc(server) as c:
                sent = c.post(f"/devices/{rid}/messages/deviceBound", content=b"hello device",
                              headers={"iothub-messageid": "c2d-7", "iothub-app-color": "blue"}).status_code
                patched = c.patch(f"/twins/{rid}", json={"properties": {"desired": {"interval": 5}}}).status_code
            return sent, patched

        assert await asyncio.to_thread(send) == (202, 200)
        await wait_for(lambda: traffic("c2d") and traffic("desired"))
        assert traffic("c2d") == [{"messageId": "c2d-7", "body": "hello device", "properties": {"color": "blue"}}]
        assert traffic("desired")[0]["patch"]["interval"] == 5

        await agent.hub._client.close(ConnectionLost("network cut (test)"))
        await wait_for(lambda: traffic("reconnected"))
        assert "network cut (test)" in traffic("disconnected")[0]["reason"]
        assert traffic("reconnected") == [{"reconnects": 1}] and agent.status.connected
        await agent.stop()
        await task

    asyncio.run(scenario())


# ---------------------------------------------------------------- a refused certificate (issue 17.5)
def revoke(server, serial: int | None = None, *, device_id: str | None = None) -> dict:
    """Revoke one certificate (by serial, reason keyCompromise) or all of a device's, through the REST API."""
    with svc(server) as c:
        if serial is not None:
            r = c.post(f"/deviceCertificates/{serial:X}/revoke", json={"reason": "keyCompromise"})
        else:
            r = c.post("/deviceCertificates/revoke", json={"deviceId": device_id, "reason": "cessationOfOperation"})
    assert r.status_code == 200, r.text
    return r.json()


def reported(server, device_id: str) -> dict:
    with svc(server) as c:
        return c.get(f"/twins/{device_id}").json()["properties"]["reported"]


def counting(monkeypatch) -> tuple[list[str], list[str]]:
    """DPS registrations and hub CONNECTs the agent makes (registration ids, device ids), in order."""
    registrations: list[str] = []
    connects: list[str] = []
    real_register, real_open = ProvisioningClient.register, HubClient._open

    async def register(self, csr_b64=None, payload=None):
        registrations.append(self.registration_id)
        return await real_register(self, csr_b64, payload)

    async def open_(self):
        connects.append(self.device_id)
        return await real_open(self)

    monkeypatch.setattr(ProvisioningClient, "register", register)
    monkeypatch.setattr(HubClient, "_open", open_)
    return registrations, connects


def lifecycle(seen: list[tuple[str, dict]]) -> list[str]:
    return [event for event, details in seen if not details]


def test_a_revoked_certificate_is_replaced_through_dps_and_reported(server, tmp_path, monkeypatch):
    """Revoked through the REST API while connected: the hub drops the session and refuses the reconnect (CONNACK 5);
    the agent registers again with its onboarding key, connects with the new certificate, delivers what was queued
    and reports the re-provisioning in its twin and as events."""
    rid, doc = enroll(server, "agent-revoked")
    registrations, _ = counting(monkeypatch)
    clock = FakeClock(datetime.now(UTC))  # renewals stay far away; the backoffs would wait for the test
    seen: list[tuple[str, dict]] = []

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc), clock=clock, sleep=clock.sleep, rng=random.Random(SEED),
                            on_event=lambda event, status, details: seen.append((event, details)))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        first = agent.credentials.certificate
        done = await asyncio.to_thread(revoke, server, first.serial_number)
        assert done["revoked"] and done["revocationReason"] == "keyCompromise"
        queued = agent.queue_telemetry("queued after the revocation", message_id="after-revoke")
        await wait_for(lambda: agent.status.reprovisions == 1 and agent.status.state == "connected")
        new = agent.credentials.certificate
        assert new.serial_number != first.serial_number and public_key(new) != public_key(first)
        assert agent.store.current().certificate == new and not agent.store.pending  # stored; the revoked set is gone
        status = agent.status
        assert (status.connected, status.failures, status.refused_certificates, status.next_retry) == (True, 0, 0, None)
        assert status.last_reprovision == clock.now and status.certificate == certificate_summary(new)
        assert f"refused certificate {first.serial_number:X} (CONNACK 5" in status.reprovision_reason
        await asyncio.wait_for(queued, 10)  # kept across the re-provisioning, sent with the new certificate
        twin = reported(server, rid)
        assert twin["certificate"] == certificate_summary(new)
        assert twin["reprovisioning"] == {"lastReprovisioned": clock.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                          "reason": "hubRefusedCertificate", "returnCode": 5,
                                          "refusedSerialNumber": f"{first.serial_number:X}", "hub": status.assigned_hub}
        await agent.stop()
        await task

    asyncio.run(scenario())
    assert registrations == [rid, rid]  # onboarding, then the one re-provisioning
    assert lifecycle(seen) == ["provisioned", "connected", "certificate-refused", "provisioned", "reprovisioned"]
    assert len([e for e, _ in seen if e == "disconnected"]) == 1  # the drop (EOF or a reset: how the socket closes)
    assert [e["event"]["payload"] for e in events(server, rid, 1)] == ["queued after the revocation"]


def test_a_refused_reprovisioning_backs_off_and_says_why(server, tmp_path, monkeypatch):
    """Enrollment disabled, then deleted, and the certificate revoked: DPS refuses (403, then 401/404); the agent does
    not spin (one DPS attempt per backoff step, the step doubling), shows state "refused" with DPS's answer, keeps
    its onboarding key, and re-provisions once the enrollment is back."""
    rid, doc = enroll(server, "agent-revoked-off")
    registrations, connects = counting(monkeypatch)
    clock = FakeClock(datetime.now(UTC))
    seen: list[tuple[str, dict]] = []

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc), clock=clock, sleep=clock.sleep, rng=random.Random(SEED),
                            on_event=lambda event, status, details: seen.append((event, details)))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        expected_rng = random.Random(SEED)
        expected_rng.random()  # the first certificate's renewal jitter
        first = agent.credentials.certificate
        update_enrollment(server, rid, doc, provisioningStatus="disabled")
        revoked = await asyncio.to_thread(revoke, server, device_id=rid)
        assert [int(c["serialNumber"], 16) for c in revoked["value"]] == [first.serial_number]
        await wait_for(lambda: agent.status.state == "refused" and agent.status.next_retry is not None)
        status = agent.status
        assert status.last_error.startswith("re-provisioning refused by DPS: ProvisioningError: 403 403003")
        assert (status.connected, status.failures, status.refused_certificates, status.reprovisions) == (False, 1, 1, 0)
        assert status.next_retry == clock.now + timedelta(seconds=300 * (0.5 + 0.5 * expected_rng.random()))
        assert status.certificate == certificate_summary(first)  # nothing better to hold: the revoked set stays
        # no spinning: while real time passes and the device clock does not reach next_retry, nothing is attempted
        attempts = (len(registrations), len(connects))
        await asyncio.sleep(1.0)
        assert (len(registrations), len(connects)) == attempts == (2, 2)  # onboarding + 1; first CONNECT + 1 reconnect
        assert lifecycle(seen)[2:] == ["certificate-refused", "reprovision-failed"]

        # deleted: the next attempt (after the backoff) tries the revoked set once, then DPS once, and waits twice as long
        with svc(server) as c:
            assert c.delete(f"/enrollments/{rid}").status_code == 204
        retry_at = status.next_retry
        await wait_for(lambda: retry_at in clock.deadlines())
        clock.set(retry_at)
        await wait_for(lambda: agent.status.failures == 2 and agent.status.next_retry is not None)
        status = agent.status
        assert status.state == "refused" and status.last_error.startswith("re-provisioning refused by DPS")
        assert status.next_retry == retry_at + timedelta(seconds=600 * (0.5 + 0.5 * expected_rng.random()))
        assert (len(registrations), len(connects)) == (3, 3)

        # the operator enrolls the device again (same key): the next attempt re-provisions and connects
        with svc(server) as c:
            put(c, f"/enrollments/{rid}", {"attestation": doc["attestation"],
                                           "credentialPolicyName": doc["credentialPolicyName"]})
        clock.set(status.next_retry)
        await wait_for(lambda: agent.status.reprovisions == 1 and agent.status.state == "connected")
        new = agent.credentials.certificate
        assert new.serial_number != first.serial_number
        assert reported(server, rid)["reprovisioning"]["refusedSerialNumber"] == f"{first.serial_number:X}"
        assert "refused by DPS" in agent.status.last_error  # the last error stays visible, with its time
        await agent.stop()
        await task

    asyncio.run(scenario())
    assert len(registrations) == 4
    assert lifecycle(seen)[2:] == ["certificate-refused", "reprovision-failed", "reprovision-failed", "provisioned",
                                   "reprovisioned"]


def test_fresh_certificates_refused_by_the_hub_stop_the_reprovisioning(server, tmp_path, monkeypatch):
    """The hub identity is disabled: every certificate is refused (CONNACK 5), fresh ones too. After reprovision_limit
    refused fresh certificates the agent stops asking DPS and only retries the connection with backoff; re-enabled,
    the device connects with the newest certificate without another registration."""
    rid, doc = enroll(server, "agent-hub-off")
    registrations, connects = counting(monkeypatch)
    clock = FakeClock(datetime.now(UTC))

    def set_device(status: str) -> None:
        with svc(server) as c:
            dev = c.get(f"/devices/{rid}").json()
            dev["status"] = status
            assert c.put(f"/devices/{rid}", json=dev, headers={"If-Match": "*"}).status_code == 200

    async def next_attempt(agent: DeviceAgent, failures: int) -> None:
        retry_at = agent.status.next_retry
        await wait_for(lambda: retry_at in clock.deadlines())
        clock.set(retry_at)
        await wait_for(lambda: agent.status.failures == failures and agent.status.next_retry is not None)

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, reprovision_limit=2), clock=clock, sleep=clock.sleep,
                            rng=random.Random(SEED))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        first = agent.credentials.certificate
        await asyncio.to_thread(set_device, "disabled")  # drops the live session; the reconnect is refused
        await wait_for(lambda: agent.status.failures == 1 and agent.status.next_retry is not None)
        assert agent.status.last_error.startswith(f"hub {agent.status.assigned_hub} refused the re-provisioned "
                                                  "certificate")
        assert (len(registrations), agent.status.refused_certificates, agent.status.state) == (2, 2, "reprovisioning")
        assert not agent.store.pending  # the refused set is not kept to roll back to (a restart would try it first)
        await next_attempt(agent, 2)  # the newest certificate again, refused, then the second (and last) registration
        assert (len(registrations), agent.status.refused_certificates) == (3, 3)
        newest = agent.credentials.certificate
        await next_attempt(agent, 3)  # the limit: only the connection is retried
        status = agent.status
        assert status.state == "refused" and "refused 2 freshly issued certificates in a row" in status.last_error
        assert len(registrations) == 3 and agent.credentials.certificate == newest
        before = len(connects)
        await next_attempt(agent, 4)
        assert len(registrations) == 3 and len(connects) == before + 1  # one CONNECT per backoff step
        await asyncio.to_thread(set_device, "enabled")
        clock.set(agent.status.next_retry)
        await wait_for(lambda: agent.status.state == "connected")
        assert agent.credentials.certificate == newest != first and agent.status.reprovisions == 1
        assert len(registrations) == 3 and agent.status.failures == 0 and agent.status.refused_certificates == 0
        assert reported(server, rid)["certificate"] == certificate_summary(newest)
        await agent.stop()
        await task

    asyncio.run(scenario())


def test_refusals_that_are_not_about_the_certificate_do_not_reprovision(server, tmp_path, monkeypatch):
    """An unreachable hub (connection refused) and CONNACK 2 (identifier rejected), at start-up and on a reconnect, are
    retried with backoff, with the stored certificate and no DPS registration; CONNACK 2 comes out as a connect-refused
    event."""
    rid, doc = enroll(server, "agent-unreachable")

    async def provision() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc))
        task = asyncio.create_task(agent.run())
        await agent.wait_ready(30)
        await agent.stop()
        await task

    asyncio.run(provision())
    stored = CertificateStore(tmp_path / "creds").current().certificate
    registrations, connects = counting(monkeypatch)
    [closed_port] = free_ports(1)  # nothing listens there
    clock = FakeClock(datetime.now(UTC))

    async def unreachable() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, hub_port=closed_port), clock=clock, sleep=clock.sleep,
                            rng=random.Random(SEED))
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: agent.status.next_retry is not None)
        await asyncio.sleep(0.3)
        status = agent.status
        assert status.state == "connecting" and status.last_error.startswith(f"cannot reach hub {HUB}: ")
        assert (len(registrations), len(connects), status.failures, status.refused_certificates) == (0, 1, 1, 0)
        await agent.stop()
        await task

    asyncio.run(unreachable())
    seen: list[tuple[str, dict]] = []
    real_username = HubClient.username
    wrong_username = property(lambda self: f"{self.hub_host}/someone-else/?api-version=x")
    monkeypatch.setattr(HubClient, "username", wrong_username)

    async def identifier_rejected() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc), clock=clock, sleep=clock.sleep, rng=random.Random(SEED),
                            on_event=lambda event, status, details: seen.append((event, details)))
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: agent.status.next_retry is not None)
        status = agent.status
        assert "identifier rejected" in status.last_error and "not a certificate refusal" in status.last_error
        assert status.refused_certificates == 0 and status.reprovisions == 0 and len(registrations) == 0
        monkeypatch.setattr(HubClient, "username", real_username)  # fixed: the next attempt connects
        clock.set(status.next_retry)
        await agent.wait_ready(30)
        assert agent.credentials.certificate == stored and len(registrations) == 0
        # the same on a reconnect: the hub client keeps retrying with its backoff, the agent does not re-provision
        monkeypatch.setattr(HubClient, "username", wrong_username)
        await agent.hub._client.close(ConnectionLost("network cut (test)"))
        await wait_for(lambda: len([e for e, _ in seen if e == "connect-refused"]) >= 3)
        assert not agent.status.connected and agent.status.refused_certificates == 0 and len(registrations) == 0
        monkeypatch.setattr(HubClient, "username", real_username)
        await wait_for(lambda: agent.status.connected)
        assert agent.credentials.certificate == stored and len(registrations) == 0 and agent.status.reprovisions == 0
        await agent.stop()
        await task

    asyncio.run(identifier_rejected())
    assert {d["returnCode"] for e, d in seen if e == "connect-refused"} == {2}
    assert lifecycle(seen) == ["connected"] and [e for e, _ in seen][-1] == "reconnected"
