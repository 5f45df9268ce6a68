"""The database goes away under a running ``opendps serve`` and comes back (PostgreSQL stopped, then started): clients
are refused as retryable while it is away — HTTP 503 with the Azure error body and Retry-After, MQTT CONNACK 3 — not
a 500 with a traceback per request; the log says it once; every path works again once it is back, without restarting
opendps. Needs a PostgreSQL of its own to stop: a throwaway cluster (initdb, pg_ctl) on a free port, one per module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from tests.conftest import _run_server, free_port, service_missing
from tests.test_device_api import device, device_sas, svc, sym_key
from tests.test_mqtt_hub import HUB, Client, hub_username, sas_device
from tests.x509_helpers import make_ca, make_leaf

from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)


class Cluster:
    """A PostgreSQL cluster in a temporary directory, run as ``postgres`` when we are root (it refuses root)."""

    def __init__(self, bindir: str, directory: Path, port: int) -> None:
        self.bindir, self.directory, self.port = bindir, directory, port
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(self.bindir, tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-l", str(self.directory / "pg.log"),
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-m", "fast", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def cluster():
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    bindir = bindirs[-1] if bindirs else os.path.dirname(shutil.which("pg_ctl") or "")
    if not bindir or not os.path.exists(os.path.join(bindir, "initdb")):
        service_missing("PostgreSQL's initdb and pg_ctl are not installed: no database of our own to stop")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            service_missing("running as root without a postgres user to run a throwaway PostgreSQL as")
    directory = Path(tempfile.mkdtemp(prefix="opendps-outage-", dir="/tmp"))
    if os.geteuid() == 0:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    pg = Cluster(bindir, directory, free_port())
    try:
        pg.init()
        yield pg
    finally:
        with contextlib.suppress(Exception):  # a test left it stopped
            pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    """Two workers: each is a node with its own pool, bus listener, presence writer and heartbeat to bring back."""
    yield from _run_server(cluster.url, tmp_path_factory.mktemp("outage"), extra_args=("--workers", "2"))


def _register(server, rid: str, key: str) -> httpx.Response:
    with device(server) as d:
        return d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": "2021-06-01"},
                     json={"registrationId": rid},
                     headers={"Authorization": device_sas(server.id_scope, rid, key)})


def _hub_connack(server, device_id: str, key: str) -> int | None:
    client = Client(server, device_id, hub_username(device_id), password=sas.generate(f"{HUB}/devices/{device_id}", key))
    client.close()
    return client.rc


def _ocsp_status(server) -> x509_ocsp.OCSPResponseStatus:
    """The response status of an OCSP request (for a CA this server does not publish) to the plain-HTTP port."""
    ca = make_ca("outage-ocsp-ca")
    leaf, _ = make_leaf("outage-ocsp-leaf", ca)
    request = x509_ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.cert, hashes.SHA1()).build()
    r = httpx.post(f"http://127.0.0.1:{server.http_port}/ocsp", content=request.public_bytes(Encoding.DER),
                   headers={"Content-Type": "application/ocsp-request"}, timeout=30)
    assert r.status_code == 200, r.text
    return x509_ocsp.load_der_ocsp_response(r.content).response_status


def test_a_database_outage_is_a_retryable_refusal_and_ends_by_itself(server, cluster):
    device_key = sas_device(server, "outage-dev")
    with svc(server) as c:
        enrollment_key = sym_key(c, "/enrollments/outage-reg", {"attestation": {"type": "symmetricKey"}})
    assert _hub_connack(server, "outage-dev", device_key) == 0
    log = Path(server.data_dir).parent / "server.log"
    before = len(log.read_text())

    cluster.stop()
    try:
        with svc(server) as c:
            r = c.get("/devices/outage-dev")
        assert r.status_code == 503, r.text
        assert r.json()["errorCode"] == 503001 and "database" in r.json()["message"], r.text
        assert r.headers["x-ms-error-code"] == "503001" and int(r.headers["Retry-After"]) > 0
        r = _register(server, "outage-reg", enrollment_key)
        assert r.status_code == 503 and r.json()["errorCode"] == 503001, r.text
        # MQTT 3.1.1: "server unavailable", which a device retries (5, not authorized, it may give up on)
        assert _hub_connack(server, "outage-dev", device_key) == 3
        # RFC 6960's retryable answer, not internalError with a traceback per request
        assert _ocsp_status(server) == x509_ocsp.OCSPResponseStatus.TRY_LATER
    finally:
        cluster.start()

    # the pools reconnect by themselves within seconds. A pooled connection used less than PING_IDLE_AFTER before
    # the database went away is not pinged at its next checkout (store._PingWhenIdle): when the restart is that quick,
    # the request that finds it broken is refused as retryable (503, CONNACK 3) and every older connection of that
    # process is then pinged — so each answer comes back within the deadline, at most a refusal or two later
    deadline = time.monotonic() + 15

    def eventually(ask, wanted, what: str):
        while True:
            got = ask()
            if got == wanted or time.monotonic() > deadline:
                assert got == wanted, f"{what}: {got}"
                return
            time.sleep(0.2)

    def get_device() -> int:
        with svc(server) as c:
            return c.get("/devices/outage-dev").status_code

    eventually(get_device, 200, "service API")
    eventually(lambda: _register(server, "outage-reg", enrollment_key).status_code, 202, "registration")
    eventually(lambda: _hub_connack(server, "outage-dev", device_key), 0, "hub CONNECT")
    # answered again (a CA not published here)
    eventually(lambda: _ocsp_status(server), x509_ocsp.OCSPResponseStatus.UNAUTHORIZED, "OCSP")

    told = log.read_text()[before:]
    assert "Traceback" not in told and "internal error" not in told, told
    for said in ("the database is unavailable (", "the database answers again"):  # once a worker, however many
        workers = [line.split("]", 1)[0] for line in told.splitlines() if said in line]  # requests were refused
        assert workers and len(workers) == len(set(workers)), told
