"""Resource exhaustion under a real ``opendps serve`` (SQLite, descriptor limit 256): the process out of file
descriptors, and the domain threads held by a slow custom-allocation webhook. What must hold: the refusal is clear and
retryable, the CPU does not spin, the log stays bounded, and service resumes by itself once the resource is back.

Store-independent: one SQLite server for the module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import resource
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from tests.conftest import _run_server, database
from tests.test_device_api import assert_azure_error, device_sas, svc, sym_key
from tests.test_mqtt_hub import sas_client, sas_device

from opendps.provisioning.allocation import WEBHOOK_CALLS_AT_ONCE
from opendps.transport.mqtt.codec import Connack, Connect, Decoder, encode

pytestmark = pytest.mark.timeout(180, func_only=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exhaustion")
    with database("sqlite", tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path, max_open_files=256)


def _log(server) -> str:
    return (server.data_dir.parent / "server.log").read_text()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _tls(server, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=server.ca_file)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost")


def _served(server) -> list[str]:
    """Which listeners answer a real client now (HTTPS /healthz, an MQTT CONNECT's CONNACK, plain HTTP)."""
    ok = []
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=server.ca_file), timeout=5) as c:
            if c.get(f"{server.url}/healthz").status_code == 200:
                ok.append("HTTPS")
    except httpx.HTTPError:
        pass
    try:
        with _tls(server, server.mqtt_port) as s:
            s.sendall(encode(Connect(client_id="nobody", username="unknown.example/nobody/?api-version=2021-04-12",
                                     keepalive=30)))
            decoder = Decoder()
            packets = []
            while not packets and (data := s.recv(64)):
                packets = decoder.feed(data)
            if packets and isinstance(packets[0], Connack):
                ok.append("MQTT")
    except OSError:
        pass
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as s:
            s.sendall(b"GET /crl/0000000000000000.crl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 "):
                ok.append("HTTP")
    except OSError:
        pass
    return ok


def test_a_process_out_of_descriptors_pauses_its_listeners_without_spinning_and_recovers(server):
    """At the descriptor limit every accept() fails with EMFILE. asyncio used to retry it up to its backlog (1,024)
    times per wake-up, logging each with a traceback and scheduling as many returns: a core spun and the log grew by
    ~35,000 lines a second. Now each listener pauses a second per failure, one line a minute says why, and the
    connections waiting in the listen queue are served once descriptors are free."""
    pid = server.proc.pid
    assert _served(server) == ["HTTPS", "MQTT", "HTTP"]
    lines_before = len(_log(server).splitlines())
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 4, hard))
    waiting: list[socket.socket] = []
    try:
        # connect() succeeds in the kernel's listen queue; the server cannot accept most of them
        for port in (server.mqtt_port, server.http_port, server.amqp_port):
            waiting += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
        time.sleep(1)
        cpu = _cpu_seconds(pid)
        time.sleep(3)
        spent = _cpu_seconds(pid) - cpu
        assert spent < 1.0, f"the server spun at its descriptor limit: {spent:.2f} s of CPU in 3 s"
        log = _log(server)
        assert "socket.accept() out of system resource" not in log
        assert "cannot accept connections on 127.0.0.1:" in log and "Too many open files" in log
        assert len(log.splitlines()) - lines_before < 30, log.splitlines()[lines_before:][-20:]
    finally:
        for s in waiting:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 20
    while (served := _served(server)) != ["HTTPS", "MQTT", "HTTP"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert served == ["HTTPS", "MQTT", "HTTP"], "service did not resume once descriptors were free"
    assert server.proc.poll() is None


class _HeldWebhook(BaseHTTPRequestHandler):
    """A custom-allocation webhook that answers only once ``release`` is set (a webhook slow to answer)."""

    release = threading.Event()
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _HeldWebhook.lock:
            _HeldWebhook.received += 1
        _HeldWebhook.release.wait(60)
        body = json.dumps({"iotHubHostName": "localhost"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_slow_allocation_webhook_cannot_hold_every_domain_thread(server):
    """Registrations whose webhook takes its time each hold a domain thread while they wait. Eight of them held all
    eight, and every hub CONNECT and service API call waited as long as the webhook did (~30 s for a webhook answering
    after 30 s). Now a process waits on at most WEBHOOK_CALLS_AT_ONCE webhook answers; further registrations are
    refused at once as retryable (503 with Retry-After, nothing sent to the webhook) and the rest is served."""
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _HeldWebhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/allocate"
    ca = ssl.create_default_context(cafile=server.ca_file)
    with svc(server) as c:
        group_key = sym_key(c, "/enrollmentGroups/held-webhook", {
            "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01", "timeoutInSeconds": 60}})
    hub_key = sas_device(server, "starved-device")

    def register(rid: str, timeout: float) -> httpx.Response:
        key = base64.b64encode(hmac.new(base64.b64decode(group_key), rid.encode(), hashlib.sha256).digest()).decode()
        with httpx.Client(base_url=server.url, verify=ca, timeout=timeout) as d:
            return d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": "2021-06-01"},
                         json={"registrationId": rid}, headers={"Authorization": device_sas(server.id_scope, rid, key)})

    held: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda i=i: held.append(register(f"held-{i}", 90)))
               for i in range(WEBHOOK_CALLS_AT_ONCE)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _HeldWebhook.received < WEBHOOK_CALLS_AT_ONCE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _HeldWebhook.received == WEBHOOK_CALLS_AT_ONCE
        # as many again, side by side (each waits WEBHOOK_SLOT_WAIT for a slot): refused, retryable, without
        # reaching the webhook
        with ThreadPoolExecutor(WEBHOOK_CALLS_AT_ONCE) as pool:
            refused = list(pool.map(lambda i: register(f"turned-away-{i}", 10), range(WEBHOOK_CALLS_AT_ONCE)))
        for r in refused:
            assert_azure_error(r, 503, "webhook")
            assert r.headers["Retry-After"] == "5"
        assert _HeldWebhook.received == WEBHOOK_CALLS_AT_ONCE
        # the rest of the service is served meanwhile: the service API and a hub CONNECT
        started = time.monotonic()
        with svc(server) as c:
            c.timeout = httpx.Timeout(10)
            assert c.get("/devices/starved-device").status_code == 200
        client = sas_client(server, "starved-device", hub_key)
        assert client.rc == 0
        client.close()
        assert time.monotonic() - started < 10
        _HeldWebhook.release.set()
        for t in threads:
            t.join(90)
        # the held registrations end assigned once the webhook answers, and the slots are free again
        assert sorted(r.status_code for r in held) == [202] * WEBHOOK_CALLS_AT_ONCE
        assert all(r.json()["status"] in ("assigned", "assigning") for r in held)
        r = register("turned-away-0", 30)
        assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    finally:
        _HeldWebhook.release.set()
        for t in threads:
            t.join(90)
        hook.shutdown()
        hook.server_close()
