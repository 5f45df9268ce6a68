"""``opendps device provision`` and ``device simulate`` against a real server (SQLite and PostgreSQL).

The device verbs use only the device endpoints: the tests create enrollments with the service API and
then onboard through the CLI exactly as an operator would, checking the stored credentials with openssl.
"""

from __future__ import annotations

import base64
import json
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.conftest import run_openssl
from tests.test_device_api import namespace, put, svc, sym_key

from opendps.cli.device import percentile

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(300, func_only=True)

NS, POLICY = "clidev-ns", "clidev-policy"
GROUP_KEY = base64.b64encode(bytes(range(7, 71))).decode()
FLEET = 64  # two waves at the default concurrency (32)


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fails(proc, *words: str) -> str:
    """Non-zero exit with exactly one ``error:`` line on stderr containing ``words``."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _https_port(server) -> str:
    return server.url.rsplit(":", 1)[1]


def _no_data_dir_env(server) -> dict:
    return {k: v for k, v in server.env.items() if not k.startswith("OPENDPS_")}


@pytest.fixture(scope="module")
def setup(server) -> dict:
    """A namespace + policy; an individual enrollment per transport; a symmetric-key group for the fleets."""
    with svc(server) as c:
        namespace(c, NS, POLICY)
        keys = {t: sym_key(c, f"/enrollments/clidev-{t}", {"attestation": {"type": "symmetricKey"},
                                                         "credentialPolicyName": POLICY}) for t in ("https", "mqtt")}
        put(c, "/enrollmentGroups/clidev-fleet", {
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
            "credentialPolicyName": POLICY})
        policy = c.get(f"/namespaces/{NS}/credentials/default/policies/{POLICY}").json()
        credential = c.get(f"/namespaces/{NS}/credentials/default").json()
    ica = policy["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"]
    return {"keys": keys, "ica": x509.load_pem_x509_certificate(ica.encode()),
            "root": x509.load_pem_x509_certificate(credential["properties"]["certificate"].encode())}


def _check_store(store: Path, rid: str, doc: dict, setup: dict) -> None:
    names = sorted(p.name for p in store.iterdir())
    assert names == ["agent.json", "chain.pem", "device.key", "device.pem", "fullchain.pem"]
    assert json.loads((store / "agent.json").read_text()) == {"assignedHub": doc["assignedHub"], "deviceId": rid}
    assert stat.S_IMODE((store / "device.key").stat().st_mode) == 0o600
    leaf, ica, root = x509.load_pem_x509_certificates((store / "fullchain.pem").read_bytes())
    assert [ica, root] == [setup["ica"], setup["root"]]
    assert leaf.subject.rfc4514_string() == f"CN={rid}"
    key = serialization.load_pem_private_key((store / "device.key").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    assert doc["certificate"] == {
        "subject": f"CN={rid}", "serialNumber": f"{leaf.serial_number:X}",
        "validFrom": leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validUntil": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thumbprint": doc["certificate"]["thumbprint"], "issuer": ica.subject.rfc4514_string()}
    assert doc["files"] == {"directory": str(store), "key": str(store / "device.key"), "certificate": str(store / "device.pem"),
                            "chain": str(store / "chain.pem"), "fullChain": str(store / "fullchain.pem"),
                            "assignment": str(store / "agent.json")}
    (store.parent / f"{rid}-root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    out = run_openssl("verify", "-CAfile", str(store.parent / f"{rid}-root.pem"), "-untrusted", str(store / "chain.pem"),
                      str(store / "device.pem"))
    assert out.stdout.strip() == f"{store / 'device.pem'}: OK"


def test_provision_symmetric_key_https_with_data_dir_defaults(server, setup, tmp_path):
    rid = "clidev-https"
    store = tmp_path / "store"
    doc = _json(server.cli("device", "provision", "--registration-id", rid, "--symmetric-key", setup["keys"]["https"],
                           "--store-dir", str(store)))
    assert {k: doc[k] for k in ("registrationId", "status", "assignedHub", "deviceId", "substatus", "transport")} == {
        "registrationId": rid, "status": "assigned", "assignedHub": "localhost", "deviceId": rid,
        "substatus": "initialAssignment", "transport": "https"}
    _check_store(store, rid, doc, setup)


def test_provision_symmetric_key_mqtt_with_explicit_flags(server, setup, tmp_path):
    """No data directory to default from: every connection flag given, as on a real device."""
    rid = "clidev-mqtt"
    store = tmp_path / "store"
    args = ["device", "provision", "--registration-id", rid, "--symmetric-key", setup["keys"]["mqtt"],
            "--transport", "mqtt", "--id-scope", server.id_scope, "--provisioning-host", "localhost",
            "--https-port", "1", "--mqtt-port", str(server.mqtt_port), "--ca-file", str(server.ca_file),
            "--store-dir", str(store)]
    doc = _json(server.cli(*args, env=_no_data_dir_env(server)))
    assert [doc["registrationId"], doc["status"], doc["assignedHub"], doc["deviceId"], doc["transport"]] == [
        rid, "assigned", "localhost", rid, "mqtt"]
    _check_store(store, rid, doc, setup)
    first = (store / "device.pem").read_bytes()
    # again, as a table: a new key and certificate; the previous set is kept until the agent confirms the new one
    table = server.cli(*args, "-o", "table", env=_no_data_dir_env(server))
    assert table.returncode == 0, table.stderr
    assert rid in table.stdout and "localhost" in table.stdout
    assert (store / "device.pem").read_bytes() != first
    assert (store / "previous" / "device.pem").read_bytes() == first


def test_provision_errors_are_one_line(server, setup, tmp_path):
    rid = "clidev-https"
    store = tmp_path / "never"
    wrong = base64.b64encode(b"w" * 32).decode()
    line = _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", wrong, "--store-dir", str(store)),
                  f"registration of {rid!r} failed", "status 401")
    assert wrong not in line
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", wrong, "--transport", "mqtt",
                      "--store-dir", str(store)), f"registration of {rid!r} failed", "status 401")
    _fails(server.cli("device", "provision", "--rid", "clidev-nobody", "--symmetric-key", wrong, "--store-dir", str(store)),
           "registration of 'clidev-nobody' failed", "status 401")
    assert not store.exists()
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", "not base64!"),
           "--symmetric-key is not a valid base64 key")
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", wrong, "--group-key", wrong),
           "exactly one onboarding credential")
    _fails(server.cli("device", "provision", "--rid", rid), "exactly one onboarding credential")
    _fails(server.cli("device", "provision", "--rid", rid, "--certificate-file", str(tmp_path / "x.pem")),
           "--certificate-file and --key-file go together")
    _fails(server.cli("device", "provision", "--rid", rid, "--certificate-file", str(tmp_path / "x.pem"),
                      "--key-file", str(tmp_path / "x.key")), "cannot load TLS files")
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", wrong, env=_no_data_dir_env(server)),
           "--id-scope is required")
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", setup["keys"]["https"], "--https-port",
                      str(server.mqtt_port), "--retries", "0"), f"registration of {rid!r} failed")


def test_a_store_dir_that_cannot_be_written_is_refused_before_dps_issues_a_certificate(server, setup, tmp_path):
    """The certificate was issued first and its new key lost when --store-dir could not be written."""
    rid = "clidev-nostore"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    _fails(server.cli("device", "provision", "--rid", rid, "--symmetric-key", key, "--store-dir",
                      str(in_the_way / "store")), f"cannot store credentials in {in_the_way / 'store'}",
           "nothing was asked of DPS")
    issued = server.cli("certificate", "list", "--device-id", rid, "-o", "json")
    assert issued.returncode == 0, issued.stderr
    assert json.loads(issued.stdout) == []
    with svc(server) as c:
        assert c.get(f"/registrations/{rid}").status_code == 404  # never registered


def _simulate(server, transport: str, prefix: str) -> tuple[dict, float]:
    started = time.monotonic()
    proc = server.cli("device", "simulate", "--count", str(FLEET), "--group-key", GROUP_KEY, "--prefix", prefix,
                      "--transport", transport, "-o", "json")
    elapsed = time.monotonic() - started
    summary = _json(proc)
    print(f"simulate {FLEET} over {transport}: {elapsed:.1f} s {summary['latencySeconds']}")
    return summary, elapsed


def test_simulate_fleet_provisions_and_connects_every_device(server, setup):
    # one fleet per server: over HTTPS on SQLite, over MQTT on PostgreSQL (each transport and each store once)
    transport = "mqtt" if server.db_url.startswith("postgresql") else "https"
    prefix = f"fleet-{transport}"
    summary, elapsed = _simulate(server, transport, prefix)
    assert {k: summary[k] for k in ("count", "transport", "concurrency", "provisioned", "connected", "failed", "errors")} == {
        "count": FLEET, "transport": transport, "concurrency": 32, "provisioned": FLEET, "connected": FLEET,
        "failed": 0, "errors": []}
    latency = summary["latencySeconds"]
    for phase in ("provisioning", "hub"):
        assert 0 < latency[phase]["p50"] <= latency[phase]["p95"] <= latency[phase]["max"]
    assert summary["totalSeconds"] <= elapsed
    states = _json(server.cli("dps", "registration", "list", "--enrollment-id", "clidev-fleet"))
    mine = sorted(s["registrationId"] for s in states if s["registrationId"].startswith(prefix + "-"))
    assert mine == sorted(f"{prefix}-{i}" for i in range(FLEET))
    assert {s["status"] for s in states if s["registrationId"].startswith(prefix + "-")} == {"assigned"}
    devices = _json(server.cli("dps", "linked-hub", "device-list", "--hub-name", "default"))
    assert sum(d["deviceId"].startswith(prefix + "-") for d in devices) == FLEET


def test_simulate_reports_failures_and_exits_non_zero(server, setup, tmp_path):
    wrong = base64.b64encode(b"x" * 64).decode()
    proc = server.cli("device", "simulate", "--count", "3", "--group-key", wrong, "--prefix", "fleet-bad", "-o", "json",
                      "--no-connect")
    line = _fails(proc, "3 of 3 devices failed", "provisioning: 401")
    assert wrong not in line
    summary = json.loads(proc.stdout)
    assert [summary["provisioned"], summary["connected"], summary["failed"]] == [0, None, 3]
    assert summary["errors"] == [{"message": "provisioning: 401 401002 no symmetric-key enrollment or group accepts this "
                                             "signature for '<id>'", "count": 3, "example": "fleet-bad-0"}]
    assert line == ("error: 3 of 3 devices failed (first: provisioning: 401 401002 no symmetric-key enrollment or group "
                    "accepts this signature for 'fleet-bad-0')")
    # --no-connect with --store-dir: provisioned only, credentials kept per device
    ok = _json(server.cli("device", "simulate", "--count", "2", "--group-key", GROUP_KEY, "--prefix", "fleet-kept",
                          "--no-connect", "--store-dir", str(tmp_path / "kept"), "-o", "json"))
    assert [ok["provisioned"], ok["connected"], ok["failed"], ok["latencySeconds"]["hub"]] == [2, None, 0, None]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["fleet-kept-0", "fleet-kept-1"]
    table = server.cli("device", "simulate", "--count", "2", "--group-key", GROUP_KEY, "--prefix", "fleet-table",
                       "--store-dir", str(tmp_path / "kept"), "--hub-address", "127.0.0.1", "--transport", "mqtt")
    assert table.returncode == 0, table.stderr
    assert "provisioned" in table.stdout and "p50 / p95" in table.stdout
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["fleet-kept-0", "fleet-kept-1", "fleet-table-0",
                                                                      "fleet-table-1"]
    assert stat.S_IMODE((tmp_path / "kept" / "fleet-table-0" / "device.key").stat().st_mode) == 0o600


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, 0.5), percentile(values, 0.95), percentile(values, 1.0)] == [50.0, 95.0, 100.0]
    assert percentile([3.0], 0.95) == 3.0 and percentile([], 0.5) is None


def test_device_run_provisions_connects_sends_and_renews(server, setup, tmp_path):
    rid = "clidev-run"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    out = server.cli("device", "run", "--registration-id", rid, "--symmetric-key", key, "--store-dir", str(tmp_path / "s"),
                     "--renewal", "hub", "--renew-now", "--telemetry-interval", "0.2", "--duration", "2")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    assert events[:2] == ["provisioned", "connected"] and "renewed" in events, events
    renewed = lines[events.index("renewed")]
    assert renewed["renewals"] == 1 and renewed["certificate"]["serialNumber"] != lines[0]["certificate"]["serialNumber"]
    with svc(server) as c:
        reported = c.get(f"/twins/{rid}").json()["properties"]["reported"]["certificate"]
        assert reported["serialNumber"] == renewed["certificate"]["serialNumber"]
        sent = c.get("/events", params={"from": "earliest", "deviceId": rid, "count": 2, "timeout": 5}).text
    assert len([line for line in sent.splitlines() if line.strip()]) == 2


def test_device_run_with_a_refused_renewal_is_one_line(server, setup, tmp_path):
    """Issue 12.11: a renewal the service refuses ends `device run --renew-now` with one error line."""
    rid = "clidev-refused"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    store = str(tmp_path / "s")
    _json(server.cli("device", "provision", "--rid", rid, "--symmetric-key", key, "--store-dir", store))
    with svc(server) as c:
        put(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY,
                                       "provisioningStatus": "disabled"}, status=200)
    out = server.cli("device", "run", "--registration-id", rid, "--symmetric-key", key, "--store-dir", store,
                     "--renewal", "hub", "--renew-now", "--duration", "5")
    line = _fails(out, f"renewal of {rid!r} failed")
    assert "disabled" in line and "Traceback" not in out.stderr


def test_device_run_renew_now_ends_within_its_duration_when_the_device_never_connects(server, setup, tmp_path):
    """`device run --renew-now --duration N` waited for a first connection without bound: a device refused (a wrong
    key: 401, retried) ran until killed. It ends after N seconds, non-zero, saying the renewal was not done."""
    rid = "clidev-never"
    with svc(server) as c:
        sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    wrong = base64.b64encode(bytes(32)).decode()
    started = time.monotonic()
    out = server.cli("device", "run", "--registration-id", rid, "--symmetric-key", wrong, "--store-dir",
                     str(tmp_path / "s"), "--renew-now", "--duration", "2")
    assert time.monotonic() - started < 30  # was: until killed
    line = _fails(out, f"renewal of {rid!r} was not done within --duration 2 s")
    assert "did not connect" in line and "Traceback" not in out.stderr
    # without --renew-now too: a bounded run that never reached the hub did not succeed (it exited 0)
    out = server.cli("device", "run", "--registration-id", rid, "--symmetric-key", wrong, "--store-dir",
                     str(tmp_path / "s"), "--duration", "1")
    line = _fails(out, f"{rid!r} did not connect to its hub within --duration 1 s")


def test_device_run_reuses_what_provision_stored_and_prints_traffic(server, setup, tmp_path):
    """Issue 12.15: `device provision` then `device run` connects with the stored set (no second certificate), and
    the running agent answers direct methods and prints one line for each method call and C2D message."""
    rid = "clidev-follow"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    store = str(tmp_path / "s")
    provisioned = _json(server.cli("device", "provision", "--rid", rid, "--symmetric-key", key, "--store-dir", store))
    serials = server.cli("adr", "ns", "device", "list", "--namespace", NS, "--query",
                         f"[?name=='{rid}'].properties.operationalCertificate.serialNumber", "-o", "tsv")
    assert serials.stdout.split() == [provisioned["certificate"]["serialNumber"]]  # the namespace's device registry
    record = _json(server.cli("adr", "ns", "device", "show", "--namespace", NS, "-d", rid))
    assert record["properties"]["registrationId"] == rid
    agent = subprocess.Popen([sys.executable, "-m", "opendps", "device", "run", "--rid", rid, "--symmetric-key", key,
                              "--store-dir", store, "--duration", "120"], env=server.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(json.loads(line)) for line in agent.stdout], daemon=True).start()

    def next_line() -> dict:
        try:
            return lines.get(timeout=60)
        except queue.Empty:
            agent.kill()
            pytest.fail(f"device run printed nothing more: {agent.stderr.read()}")

    try:
        connected = next_line()
        assert connected["event"] == "connected", connected  # not "provisioned": the stored set is used
        assert connected["certificate"]["serialNumber"] == provisioned["certificate"]["serialNumber"]
        with svc(server) as c:
            answer = c.post(f"/twins/{rid}/methods", json={"methodName": "getStatus", "responseTimeoutInSeconds": 10})
            assert answer.json()["status"] == 200 and answer.json()["payload"]["device_id"] == rid
            assert c.post(f"/devices/{rid}/messages/deviceBound", content=b"open the valve",
                          headers={"iothub-messageid": "cli-c2d-1"}).status_code == 202
        method, c2d = next_line(), next_line()
        assert {k: method[k] for k in ("event", "deviceId", "method", "status")} == {
            "event": "method", "deviceId": rid, "method": "getStatus", "status": 200}
        assert {k: c2d[k] for k in ("event", "messageId", "body")} == {
            "event": "c2d", "messageId": "cli-c2d-1", "body": "open the valve"}
    finally:
        agent.send_signal(signal.SIGINT)
        agent.wait(30)
    assert agent.returncode == 0 and "Traceback" not in agent.stderr.read()
