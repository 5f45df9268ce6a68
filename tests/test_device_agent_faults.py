"""The device agent when the service misbehaves, against a real ``opendps serve`` (SQLite), real sockets, no mocks.

A fleet runs this agent: when DPS or the hub is away, thousands of agents must neither hammer the service nor give
up for good. The database outage is real (another SQLite connection holds ``BEGIN IMMEDIATE`` past the server's busy
timeout, so DPS answers 503 with Retry-After); the hub outage is a real TCP forwarder in front of the hub's MQTT port
that stops listening (connection refused) and listens again. The agent's own requests are observed through the
``httpx``/``httpcore`` and ``opendps.device.hub`` loggers: when each request left and what came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from tests.conftest import free_ports
from tests.test_device_agent import config, enroll
from tests.test_device_api import svc

from opendps.device.agent import DeviceAgent
from opendps.frontends.runtime import STORE_RETRY_AFTER

SERVER_STORES = ("sqlite",)  # the agent is the subject; SQLite is the store whose lock makes the 503 here
SERVER_ARGS = ("--sqlite-busy-timeout", "2")  # a locked file is an outage after 2 s, not the default 10

pytestmark = pytest.mark.timeout(120, func_only=True)


async def wait_for(predicate, timeout: float = 30, what: str = "condition", task: asyncio.Task | None = None) -> None:
    """Poll ``predicate`` until true; fail at the deadline, or at once if the agent's ``task`` died."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if task is not None and task.done():
            raise AssertionError(f"the agent stopped before {what}: {task.exception()!r}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


class Recorder(logging.Handler):
    """Records (monotonic time, logger name, message) of the given loggers; ``on_record`` may react at once."""

    def __init__(self, *names: str, on_record=None) -> None:
        super().__init__(logging.DEBUG)
        self.names = names
        self.records: list[tuple[float, str, str]] = []
        self.on_record = on_record
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        entry = (time.monotonic(), record.name, record.getMessage())
        self.records.append(entry)
        if self.on_record is not None:
            self.on_record(entry)

    def __enter__(self) -> Recorder:
        for name in self.names:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(self._levels[name])


def sqlite_file(server) -> Path:
    return Path(server.db_url.split("///", 1)[1])



async def _stop_all(agent, task, forwarder) -> None:
    """A scenario's teardown: the agent and its run task, then the forwarder (already stopped if the scenario failed
    while the hub was away)."""
    await agent.stop()
    await task
    with contextlib.suppress(AssertionError):
        await forwarder.stop()

def test_dps_503_retry_after_is_honoured_by_client_and_agent_which_recover(server, tmp_path):
    """The store is locked: DPS answers 503 with Retry-After (5 s) once the server's busy timeout passed. The
    provisioning client's own retry and the agent's next attempt (after the client gave up) each wait at least
    Retry-After, however small their configured backoff; once the lock goes the agent onboards and connects by itself.
    Before: the 503's Retry-After was dropped (only a 429's counted) and the retry came after the bare backoff."""
    rid, doc = enroll(server, "faults-503")
    lock = sqlite3.connect(sqlite_file(server), isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    refused: list[float] = []  # when a 503 came back
    sent: list[float] = []  # when a DPS request left

    def watch(entry: tuple[float, str, str]) -> None:
        at, name, message = entry
        if name == "httpx" and "/register" in message and " 503 " in message:
            refused.append(at)
            if len(refused) == 2:  # the client's retry and then the agent's attempt were refused: the service is back
                lock.execute("ROLLBACK")
        elif name == "httpcore.http11" and message.startswith("send_request_headers.started"):
            sent.append(at)

    async def scenario() -> None:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, retry_base=0.05, retry_max=0.1, provisioning_options={
            "max_retries": 1, "backoff_base": 0.05, "backoff_max": 0.1, "min_wait": 0.0, "max_wait": 30.0}))
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.status.state == "connected", 90, "connected", task)
        finally:
            await agent.stop()
            await task

    try:
        with Recorder("httpx", "httpcore.http11", on_record=watch):
            asyncio.run(scenario())
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    assert len(refused) == 2
    assert refused[0] - sent[0] < 8, "the server's --sqlite-busy-timeout 2 did not bound its wait for the lock (10 s)"
    client_retry = min(t for t in sent if t > refused[0])  # the provisioning client's own retry
    agent_retry = min(t for t in sent if t > refused[1])  # the agent's next registration, after the client gave up
    assert client_retry - refused[0] >= STORE_RETRY_AFTER, "the client retried before Retry-After"
    assert agent_retry - refused[1] >= STORE_RETRY_AFTER, "the agent retried before Retry-After"


def test_stop_abandons_a_request_waiting_out_a_retry_after(server, tmp_path):
    """The store is locked, so DPS answers 503 with Retry-After while the agent onboards; stop() then returns at once,
    abandoning the request, and the agent ends stopped. Before: stop() waited for the provisioning client to wait out
    the Retry-After and its next attempt (a device shutting down, or a service manager's stop timeout, waited with it)."""
    rid, doc = enroll(server, "faults-stop")
    lock = sqlite3.connect(sqlite_file(server), isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    refused: list[float] = []

    def watch(entry: tuple[float, str, str]) -> None:
        at, name, message = entry
        if name == "httpx" and "/register" in message and " 503 " in message:
            refused.append(at)

    async def scenario() -> tuple[float, str]:
        agent = DeviceAgent(config(server, tmp_path, rid, doc, provisioning_options={
            "max_retries": 5, "backoff_base": 0.05, "backoff_max": 0.1, "min_wait": 0.0, "max_wait": 60.0}))
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: bool(refused), 60, "a 503", task)
        began = time.monotonic()
        await agent.stop()
        await task
        return time.monotonic() - began, agent.status.state

    try:
        with Recorder("httpx", on_record=watch):
            took, state = asyncio.run(scenario())
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert state == "stopped"
    assert took < STORE_RETRY_AFTER / 2, f"stop() took {took:.1f} s: it waited for the Retry-After"


class Forwarder:
    """A TCP forwarder to the hub's port that can stop listening (the hub is down: connection refused) and listen
    again on the same port."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.update((writer, up_writer))

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


def test_a_long_hub_outage_does_not_end_the_retries(server, tmp_path):
    """The hub stays down for more than 1024 attempts, at start-up (the agent's own connect loop) and after a lost
    connection (the hub client's reconnect loop): both keep retrying, and connect once the hub listens again.
    Before: the backoff computed ``base * 2 ** attempt``, and from attempt 1025 on ``2 ** 1024`` does not fit a float:
    an OverflowError killed the agent at start-up, and silently ended the hub client's reconnecting (at the default
    60 s ceiling, after some 17 hours of outage: the device never came back). The backoffs here are tiny so that the
    attempts come quickly; the ceilings are the configured ones."""
    rid, doc = enroll(server, "faults-long")
    port = free_ports(1)[0]  # nobody listens yet: connection refused

    async def scenario() -> None:
        forwarder = Forwarder(port, server.mqtt_port)
        agent = DeviceAgent(config(server, tmp_path, rid, doc, hub_port=port, hub_address="127.0.0.1",
                                   retry_base=1e-4, retry_max=1e-3,
                                   hub_options={"backoff_base": 1e-4, "backoff_max": 1e-3, "timeout": 10}))
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.status.failures > 1030, 60, "1030 failed connects at start-up", task)
            assert agent.status.state == "connecting" and "cannot reach hub" in (agent.status.last_error or "")
            await forwarder.start()
            await wait_for(lambda: agent.status.state == "connected" and agent.status.failures == 0, 30,
                           "connected after the outage", task)

            with Recorder("opendps.device.hub") as log:
                await forwarder.stop()  # the hub goes away: the live connection drops, the hub client reconnects
                await wait_for(lambda: sum("reconnect attempt" in m for _, _, m in log.records) > 1030, 60,
                               "1030 failed reconnects", task)
                await forwarder.start()
                assert agent.hub is not None
                await wait_for(lambda: agent.hub is not None and agent.hub.connected, 30, "reconnected", task)
        finally:
            await _stop_all(agent, task, forwarder)

    asyncio.run(scenario())


RENEWING_CHILD = r"""
import sys
from datetime import UTC, datetime, timedelta
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opendps.device.store import CertificateStore

def cert(subject, key, issuer, signer, ca):
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(signer, hashes.SHA384())

ca_key = ec.generate_private_key(ec.SECP384R1())
ca = cert("faults CA", ca_key, "faults CA", ca_key, True)
store = CertificateStore(sys.argv[1])
store.save_assignment("hub.example", "dev")
n = 0
while True:  # renewals as the agent does them: save (the confirmed set moves to previous/), then confirm or rollback
    key = ec.generate_private_key(ec.SECP384R1())
    store.save(key, [cert("dev", key, "faults CA", ca_key, False), ca])
    if n == 0:
        store.confirm()
        print("ready", flush=True)
    elif n % 3 == 0:
        store.rollback()
    else:
        store.confirm()
    n += 1
"""


def test_a_kill_during_renewal_leaves_a_usable_matching_set(tmp_path):
    """``kill -9`` of a process renewing in a loop (save, then confirm or rollback), at arbitrary moments: what the
    agent loads at its next start is always a complete set whose key matches its certificate (the files are replaced
    atomically, the key last, and an interrupted switch rolls back to the confirmed set), and the temporary files the
    killed write left (private keys among them) are removed when the agent starts. Before: they piled up, one set per
    interrupted write."""
    import random
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization

    from opendps.device.agent import AgentConfig
    from opendps.device.keys import public_keys_match

    store_dir = tmp_path / "creds"
    rng = random.Random(7)
    loaded = set()
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", RENEWING_CHILD, str(store_dir)], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))  # where the kill lands, not an assertion
        finally:
            child.kill()
            child.wait()
        agent = DeviceAgent(AgentConfig(dps_host="dps.invalid", id_scope="0ne", registration_id="dev",
                                        store_dir=store_dir, symmetric_key="a2V5"))
        creds, assignment = agent._load()  # what run() starts from
        assert creds is not None and assignment == ("hub.example", "dev")
        key = serialization.load_pem_private_key(creds.key_file.read_bytes(), None)
        assert public_keys_match(key, creds.certificate)
        chain = creds.chain_file.read_bytes()
        assert chain.startswith(creds.cert_file.read_bytes())  # the chain presented to the hub starts with that leaf
        loaded.add(creds.certificate.serial_number)
        assert not [p.name for p in store_dir.rglob("*.tmp")]  # nothing the killed write left behind
    assert len(loaded) > 1  # the kills landed in different renewals


def test_a_hub_that_never_answers_the_handshake_is_retried_with_bounded_waits(server, tmp_path):
    """The hub's port accepts TCP and then says nothing (no TLS handshake, no CONNACK): every attempt ends at the hub
    client's timeout, the next one comes after the backoff (no tight loop: one connection per timeout + backoff, never
    two at once), and once the real hub answers on that port the agent connects by itself."""
    rid, doc = enroll(server, "faults-silent")
    port = free_ports(1)[0]
    accepted: list[float] = []
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        held.append(writer)  # kept open, never written to

    async def scenario() -> None:
        listener = await asyncio.start_server(silent, "127.0.0.1", port, reuse_address=True)
        agent = DeviceAgent(config(server, tmp_path, rid, doc, hub_port=port, hub_address="127.0.0.1",
                                   retry_base=0.2, retry_max=0.4, hub_options={"timeout": 0.5}))
        task = asyncio.create_task(agent.run())
        forwarder = Forwarder(port, server.mqtt_port)
        try:
            await wait_for(lambda: len(accepted) >= 4, 60, "four attempts on the silent port", task)
            assert agent.status.state == "connecting" and "TimeoutError" in (agent.status.last_error or "")
            listener.close()
            for writer in held:
                writer.close()
            await listener.wait_closed()
            await forwarder.start()
            await wait_for(lambda: agent.status.state == "connected", 30, "connected to the real hub", task)
        finally:
            await _stop_all(agent, task, forwarder)
        gaps = [b - a for a, b in zip(accepted, accepted[1:], strict=False)]
        assert min(gaps[:3]) >= 0.5, gaps  # each attempt waited out its timeout (0.5 s) before the next began

    asyncio.run(scenario())


def issued_serials(server, device_id: str) -> dict[str, str | None]:
    """The device's certificates DPS issued, by serial: None while valid, else the revocation reason."""
    with svc(server) as c:
        r = c.get("/deviceCertificates", params={"deviceId": device_id})
    assert r.status_code == 200, r.text
    return {v["serialNumber"]: v.get("revocationReason") for v in r.json()["value"]}


def test_a_certificate_renewed_while_the_hub_is_down_is_kept_and_used_when_it_is_back(server, tmp_path):
    """The hub goes away (a real forwarder in front of it stops listening) and renewals through DPS go on: the first
    one gets a new certificate and cannot switch to it (neither it nor the old one reaches the hub); that set is kept as
    the store's pending one (what a restart finds) and every later attempt tries it again instead of asking DPS for yet
    another one. When the hub is back, the hub client reconnects with the old certificate and the agent switches to the
    kept one at once (not after its backoff, 300 s here); its first CONNECT revokes the old one as superseded: one
    certificate issued for the whole outage. Before: each attempt issued a certificate and threw it away (rolled back),
    so an outage of a day at the hourly retry ceiling left DPS with 24 certificates for one device."""
    rid, doc = enroll(server, "faults-kept")
    port = free_ports(1)[0]

    async def scenario() -> None:
        forwarder = Forwarder(port, server.mqtt_port)
        await forwarder.start()
        agent = DeviceAgent(config(server, tmp_path, rid, doc, hub_port=port, hub_address="127.0.0.1"))
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.status.state == "connected", 30, "connected", task)
            assert agent.credentials is not None and agent.hub is not None
            first = f"{agent.credentials.certificate.serial_number:X}"
            await forwarder.stop()
            await wait_for(lambda: agent.hub is not None and not agent.hub.connected, 10, "the hub is away", task)
            for _ in range(3):
                with pytest.raises(Exception) as refused:  # what it says is checked below
                    await asyncio.wait_for(agent.renew_now(), 30)
                assert len(issued_serials(server, rid)) == 2, "a certificate was issued per attempt"
                current = agent.store.current()
                assert agent.store.pending and current is not None  # on disk for a restart
                kept = {f"{current.certificate.serial_number:X}"}
                assert f"the new certificate {min(kept)} is kept and used once the hub is back" in str(refused.value)
            assert issued_serials(server, rid).keys() == {first, *kept}
            assert agent.status.renewals == 0 and agent.status.certificate["serialNumber"] == first

            await forwarder.start()
            await wait_for(lambda: agent.status.certificate["serialNumber"] in kept and agent.hub is not None
                           and agent.hub.connected, 30, "switched to the kept certificate", task)
            assert agent.status.renewals == 1 and agent.status.failures == 0 and not agent.store.pending
            assert issued_serials(server, rid) == {first: "superseded", **dict.fromkeys(kept)}
        finally:
            await _stop_all(agent, task, forwarder)

    asyncio.run(scenario())


def test_a_tpm_key_write_interrupted_by_a_kill_is_swept_at_start(tmp_path):
    """``tpm-hmac.key`` (the TPM-wrapped DPS/hub key) is written atomically into the store directory like the
    credential set; the temporary file a kill -9 leaves mid-write is removed when the agent starts, as the set's are.
    Another program's temporary file in that directory is left alone. Before: only the set's and agent.json's were."""
    from opendps.device.agent import TPM_KEY_FILE, AgentConfig
    from opendps.files import write_temp

    store_dir = tmp_path / "creds"
    store_dir.mkdir()
    left = [write_temp(store_dir, TPM_KEY_FILE, b"wrapped key", 0o600) for _ in range(2)]  # what a killed write leaves
    foreign = write_temp(store_dir, "notes.txt", b"not ours", 0o600)
    agent = DeviceAgent(AgentConfig(dps_host="dps.invalid", id_scope="0ne", registration_id="dev", store_dir=store_dir,
                                    symmetric_key="a2V5"))
    assert agent._load() == (None, None)
    assert not any(p.exists() for p in left)
    assert foreign.exists()


FULL_DISK_CHILD = r"""
import asyncio, json, resource, sys
from opendps.device.agent import AgentConfig, DeviceAgent

options = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # no file may grow: EFBIG, as ENOSPC would

async def main():
    agent = DeviceAgent(AgentConfig(**options, retry_base=0.05, retry_max=0.1))
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(2)
    print(json.dumps({"state": agent.status.state, "failures": agent.status.failures, "error": agent.status.last_error}))
    task.cancel()  # the status is all this child reports
    await asyncio.gather(task, return_exceptions=True)

asyncio.run(main())
"""


def test_no_certificate_is_asked_for_while_the_store_cannot_hold_it(server, tmp_path):
    """The device's disk is full (the agent runs with a file size limit of 0, so every write fails as on a full disk):
    onboarding backs off saying why, and DPS issues nothing. Before: DPS issued a certificate per attempt (ten in
    two seconds at this backoff; one an hour at the default ceiling), each lost when the store refused it, until the
    device's own registrations got it throttled (429)."""
    import json
    import subprocess
    import sys

    rid, doc = enroll(server, "faults-full")
    options = {"dps_host": "localhost", "id_scope": server.id_scope, "registration_id": rid,
               "store_dir": str(tmp_path / "creds"), "https_port": int(server.url.rsplit(":", 1)[1]),
               "mqtt_port": server.mqtt_port, "ca_file": str(server.ca_file),
               "symmetric_key": doc["attestation"]["symmetricKey"]["primaryKey"]}
    child = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, json.dumps(options)], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0, child.stderr
    status = json.loads(child.stdout.strip().splitlines()[-1])
    assert issued_serials(server, rid) == {}
    assert status["state"] == "provisioning" and status["failures"] >= 2
    assert "cannot store credentials (File too large)" in status["error"]
