"""The data directory's disk fills under a running ``opendps serve`` on SQLite, then has room again: writes are
refused as retryable — HTTP 503 with the Azure error body and Retry-After, telemetry not acknowledged — not a 500 with
a traceback per request; nothing is half-written (no certificate without its registration); the log says it once;
every path works again once there is room, without restarting opendps, and the audit chain verifies.

"Full" is a file-size limit set on the running server (``prlimit``): every write past byte 1 of any file fails with
EFBIG, which SQLite reports as a failed write (IOERR), as it does ENOSPC on a full disk (FULL). The server's output
goes to a pipe, which the limit does not cover, so its log lines survive the limit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import database, free_ports, invoke_cli
from tests.test_device_api import assert_azure_error, csr_b64, device, device_sas, issued_count, namespace, put, svc
from tests.test_mqtt_hub import HUB, Client, hub_username, sas_device

from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)
PREVIEW = "2025-07-01-preview"


class Server:
    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("diskfull")
    with database("sqlite", tmp_path) as db_url:
        https, mqtt, amqp, http = free_ports(4)
        env = {**os.environ, "OPENDPS_DATA_DIR": str(tmp_path / "data"), "OPENDPS_DB": db_url}
        env.pop("OPENDPS_CONNECTION_STRING", None)
        env.pop("OPENDPS_MASTER_KEY", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "opendps", "serve", "--host", "127.0.0.1", "--https-port", str(https), "--mqtt-port",
             str(mqtt), "--amqp-port", str(amqp), "--http-port", str(http)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        deadline = time.time() + 120
        while not any("opendps: listening" in line for line in lines) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None or time.time() >= deadline:
            proc.kill()
            pytest.fail("server did not start: " + "".join(lines))
        info = json.loads(invoke_cli(env, "info", "--show-secrets", "-o", "json").stdout)
        try:
            yield Server(db_url=db_url, data_dir=tmp_path / "data", url=info["endpoints"]["https"]["url"],
                         connection_string=info["connectionStrings"]["provisioningServiceOwner"],
                         ca_file=Path(info["serverCaCertificate"]), env=env, proc=proc, id_scope=info["idScope"],
                         mqtt_port=mqtt, lines=lines)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _limit(server, size: int) -> None:
    _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (size, hard))


def _register(server, rid: str, key: str, csr: str):
    with device(server) as d:
        return d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                     json={"registrationId": rid, "csr": csr},
                     headers={"Authorization": device_sas(server.id_scope, rid, key)})


def _telemetry_acked(server, device_id: str, key: str) -> bool:
    """Whether a QoS 1 message is acknowledged (else the server closes the connection without PUBACK)."""
    client = Client(server, device_id, hub_username(device_id), password=sas.generate(f"{HUB}/devices/{device_id}", key))
    assert client.rc == 0
    acked, gone = threading.Event(), threading.Event()
    client.c.on_publish = lambda *a: acked.set()
    client.c.on_disconnect = lambda *a: gone.set()
    client.c.publish(f"devices/{device_id}/messages/events/", b'{"t": 1}', qos=1)
    while not acked.is_set() and not gone.is_set():
        time.sleep(0.01)
    client.close()
    return acked.is_set()


def test_a_full_disk_is_a_retryable_refusal_and_ends_without_a_restart(server, tmp_path):
    with svc(server) as c:
        namespace(c, "full-ns", "full-pol")
        put(c, "/enrollmentGroups/full-group", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "full-pol"})
    out = invoke_cli(server.env, "dps", "enrollment-group", "compute-device-key", "--enrollment-id", "full-group",
                     "--registration-id", "full-dev")
    key = out.stdout.strip().strip('"')
    telemetry_key = sas_device(server, "full-tel")
    csr = csr_b64(tmp_path, "full-dev")
    before = len(server.lines)

    _limit(server, 1)  # no write past the first byte of any file: the database and its WAL cannot grow or change
    try:
        r = _register(server, "full-dev", key, csr)
        assert_azure_error(r, 503, "database", code=503001)
        assert int(r.headers["Retry-After"]) > 0
        assert not _telemetry_acked(server, "full-tel", telemetry_key)  # not stored, so not acknowledged
        with svc(server) as c:
            assert_azure_error(c.put("/enrollments/full-ind", json={"attestation": {"type": "symmetricKey"}}), 503)
            assert_azure_error(c.patch("/twins/full-tel", json={"properties": {"desired": {"x": 1}}}), 503)
            assert c.get("/enrollmentGroups/full-group").status_code == 200  # reads still answer
    finally:
        _limit(server, resource.RLIM_INFINITY)
    said = server.lines[before:]
    assert not [line for line in said if "Traceback" in line or "internal error" in line], "".join(said)
    assert len([line for line in said if "opendps.store" in line and "cannot store" in line]) == 1, "".join(said)
    assert issued_count(server, "full-dev") == 0  # no certificate without its registration

    r = _register(server, "full-dev", key, csr)  # room again: the same requests succeed, no restart
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    assert issued_count(server, "full-dev") == 1
    assert _telemetry_acked(server, "full-tel", telemetry_key)
    with svc(server) as c:
        assert c.put("/enrollments/full-ind", json={"attestation": {"type": "symmetricKey"}}).status_code == 201
        assert c.patch("/twins/full-tel", json={"properties": {"desired": {"x": 1}}}).status_code == 200
    verify = invoke_cli(server.env, "audit", "verify")
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout + verify.stderr
