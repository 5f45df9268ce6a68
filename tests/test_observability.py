"""Metrics, structured logs and the status summary on a live server (issue 19): one ``opendps serve --log-format json
--metrics-port P`` for the module, one round of traffic (registrations over HTTPS and MQTT, a refused one, a hub
CONNECT with the issued certificate, telemetry, a refused CONNECT, a certificate that expires within a day), then:
``promtool check metrics`` on the scraped text and the counters moved by what was done; who may scrape without
credentials; ``GET /status`` and ``opendps status``; the JSON log's events, request ids and the absence of secrets.

The domain aggregates behind the numbers are tested in-process (tests/unit/test_inventory.py); the sum over
``--workers`` in tests/test_scale_out.py."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import _run_server, database, free_ports, invoke_cli, service_missing
from tests.test_device_api import PREVIEW, device_sas, namespace, svc, sym_key
from tests.test_mqtt_hub import Client, hub_username, provision_over_mqtt

from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)
TELEMETRY = json.dumps({"temperature": 21.5, "observability": True}).encode()


def scrape(url: str, **kw) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    r = httpx.get(url, timeout=30, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return samples(r.text)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Traffic:
    before: dict
    during: dict  # while the certificate device is connected
    after: dict
    after_text: str
    request_id: str  # x-ms-request-id of the first HTTPS registration
    secrets: list[str]  # what must never be in the log


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    # the metrics port is chosen with the server's own ports: two separate picks can return the same free port
    https, mqtt, amqp, http, port = free_ports(5)
    with database("sqlite", tmp) as db_url:
        for server in _run_server(db_url, tmp, https_port=https, mqtt_port=mqtt, amqp_port=amqp, http_port=http,
                                  extra_args=("--log-format", "json", "--metrics-port", str(port))):
            server.metrics_url = f"http://127.0.0.1:{port}/metrics"
            server.log_path = tmp / "server.log"
            yield server


@pytest.fixture(scope="module")
def traffic(obs, tmp_path_factory) -> Traffic:
    tmp = tmp_path_factory.mktemp("observability-devices")
    before = scrape(obs.metrics_url)
    with svc(obs) as c:
        namespace(c, "obs-ns", "obs-p", days=1)  # its certificates expire within a day
        dev_key = sym_key(c, "/enrollments/obs-dev", {"attestation": {"type": "symmetricKey"},
                                                      "credentialPolicyName": "obs-p"})
        http_keys = [sym_key(c, f"/enrollments/obs-http-{i}", {"attestation": {"type": "symmetricKey"}})
                     for i in range(2)]
    # two registrations over HTTPS (SAS devices), one refused (a wrong key)
    device = httpx.Client(base_url=obs.url, verify=ssl.create_default_context(cafile=obs.ca_file), timeout=60)
    tokens = [device_sas(obs.id_scope, f"obs-http-{i}", key) for i, key in enumerate(http_keys)]
    request_id = ""
    for i, token in enumerate(tokens):
        r = device.put(f"/{obs.id_scope}/registrations/obs-http-{i}/register", params={"api-version": PREVIEW},
                       json={"registrationId": f"obs-http-{i}"}, headers={"Authorization": token})
        assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
        request_id = request_id or r.headers["x-ms-request-id"]
    wrong = device_sas(obs.id_scope, "obs-http-0", base64.b64encode(b"w" * 32).decode())
    r = device.put(f"/{obs.id_scope}/registrations/obs-http-0/register", params={"api-version": PREVIEW},
                   json={"registrationId": "obs-http-0"}, headers={"Authorization": wrong})
    assert r.status_code == 401, r.text
    device.close()
    # one over MQTT with a CSR (a certificate of obs-ns/obs-p), then the hub with that certificate: telemetry
    dev_token = device_sas(obs.id_scope, "obs-dev", dev_key)
    _, chain, op_key = provision_over_mqtt(obs, "obs-dev", tmp, password=dev_token)
    hub = Client(obs, "obs-dev", hub_username("obs-dev"), cert=chain, key=op_key)
    assert hub.rc == 0
    hub.publish("devices/obs-dev/messages/events/", TELEMETRY)
    during = scrape(obs.metrics_url)
    hub.close()
    # a refused hub CONNECT: no such device (with a SAS that must not reach the log)
    ghost_token = sas.generate("localhost/devices/obs-ghost", base64.b64encode(b"g" * 32).decode())
    ghost = Client(obs, "obs-ghost", hub_username("obs-ghost"), password=ghost_token)
    assert ghost.rc == 5
    ghost.close()
    # the store gauges are cached a few seconds per process: wait until they show the new certificate
    deadline = time.time() + 15
    while True:
        r = httpx.get(obs.metrics_url, timeout=30)
        after = samples(r.text)
        if value(after, "opendps_certificates_valid", policy="obs-ns/obs-p") or time.time() > deadline:
            break
        time.sleep(0.5)
    owner_key = sas.parse_connection_string(obs.connection_string)["SharedAccessKey"]
    secrets = [owner_key, dev_key, *http_keys, *(t.split("sig=")[1].split("&")[0] for t in [*tokens, wrong, dev_token,
                                                                                              ghost_token])]
    return Traffic(before, during, after, r.text, request_id, secrets)


def test_promtool_accepts_the_scrape_and_the_counters_moved(obs, traffic):
    promtool = shutil.which("promtool")
    if promtool is None:
        service_missing("promtool not installed (apt-get install prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=traffic.after_text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def moved(name: str, **labels: str) -> float:
        return value(traffic.after, name, **labels) - value(traffic.before, name, **labels)

    assert moved("opendps_registrations_total", outcome="assigned", attestation="symmetricKey", transport="https") == 2
    assert moved("opendps_registrations_total", outcome="assigned", attestation="symmetricKey", transport="mqtt") == 1
    assert moved("opendps_registrations_total", outcome="refused", attestation="symmetricKey", transport="https") == 1
    assert moved("opendps_registration_refusals_total", reason="sas_invalid", transport="https") == 1
    assert moved("opendps_registration_duration_seconds_count", transport="https") == 3
    assert moved("opendps_certificate_issuance_duration_seconds_count", policy="obs-ns/obs-p") == 1
    assert moved("opendps_hub_connects_total", auth="certificateAuthority") == 1
    assert moved("opendps_hub_connect_refusals_total", reason="unknown_device") == 1
    assert moved("opendps_telemetry_messages_total", hub="default") == 1
    assert moved("opendps_telemetry_bytes_total", hub="default") == len(TELEMETRY)
    assert value(traffic.during, "opendps_hub_connections") == 1
    assert moved("opendps_domain_call_duration_seconds_count", call="Provisioning.register") == 4
    # the certificate expires within a day: in every bucket of its policy, from 1 day on
    assert value(traffic.after, "opendps_certificates_valid", policy="obs-ns/obs-p") == 1
    for days in ("1", "7", "30", "90"):
        assert value(traffic.after, "opendps_certificates_expiring", policy="obs-ns/obs-p", within_days=days) == 1
    # single process: the default process collectors are there
    assert value(traffic.after, "process_resident_memory_bytes") > 0


def test_https_metrics_need_credentials_unless_the_client_is_on_loopback(obs, traffic):
    ca = ssl.create_default_context(cafile=obs.ca_file)
    url = f"{obs.url}/metrics"
    assert "opendps_registrations_total" in str(scrape(url, verify=ca))  # loopback, no credentials
    forwarded = httpx.get(url, verify=ca, headers={"X-Forwarded-For": "203.0.113.7"}, timeout=30)
    assert forwarded.status_code == 401 and forwarded.json()["errorCode"] == 401002, forwarded.text
    with svc(obs) as c:  # the owner's SAS (ServiceConfig) is enough from anywhere
        r = c.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 200 and "opendps_hub_connects_total" in r.text
    # the plain-HTTP listener serves /metrics only
    assert httpx.get(obs.metrics_url.replace("/metrics", "/status"), timeout=30).status_code == 404


def test_status_summary_over_rest_and_cli(obs, traffic):
    with svc(obs) as c:
        r = c.get("/status", params={"refusals": "10"})
        assert r.status_code == 200, r.text
        status = r.json()
        for bad in ("101", "\u00b2", "9" * 5000, "-1"):  # "²" passes str.isdigit, int() refuses it and 5,000 digits
            r = c.get("/status", params={"refusals": bad})
            assert r.status_code == 400 and "refusals must be an integer from 0 to 100" in r.text, (bad, r.text)
    assert httpx.get(f"{obs.url}/status", verify=ssl.create_default_context(cafile=obs.ca_file)).status_code == 401
    assert set(status) == {"time", "namespaces", "policies", "linkedHubs", "enrollments", "devices", "certificates",
                           "registrations", "refusals"}
    assert status["enrollments"] == {"individual": 3, "groups": 0, "disabled": 0}
    assert status["devices"]["provisioned"] == 3 and status["linkedHubs"] == 1
    assert status["certificates"] == {"valid": 1, "expiringIn7Days": 1, "expiringIn30Days": 1}
    assert status["registrations"] == {"lastHour": 3, "assignedLastHour": 3, "failedLastHour": 0}
    recent = {(x["kind"], x["id"], x["reason"]) for x in status["refusals"]["recent"]}
    assert ("registration", "obs-http-0", "sas_invalid") in recent
    assert ("hubConnect", "obs-ghost", "unknown_device") in recent
    ghost = next(x for x in status["refusals"]["recent"] if x["id"] == "obs-ghost")
    assert ghost["hub"] == "localhost" and ghost["transport"] == "mqtt" and ghost["errorCode"] == 401002
    assert status["refusals"]["lastHour"] >= 2

    out = invoke_cli(obs.env, "status")
    assert out.returncode == 0, out.stderr
    assert "3 provisioned" in out.stdout and "1 expire within 7 days" in out.stdout, out.stdout
    assert "unknown_device" in out.stdout and "obs-ghost" in out.stdout, out.stdout
    out = invoke_cli(obs.env, "status", "-o", "json", "--refusals", "1")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # nothing but the document on stdout (no bar, no colour)
    assert data["devices"]["provisioned"] == 3 and len(data["refusals"]["recent"]) == 1


def test_json_log_events_request_ids_and_no_secrets(obs, traffic):
    deadline = time.time() + 5  # the domain's lines are written as they happen; give the last ones a moment
    while time.time() < deadline and '"hub.refused"' not in obs.log_path.read_text():
        time.sleep(0.1)
    text = obs.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines, text[:2000]
    for line in lines:
        assert {"time", "level", "logger", "event", "message", "request_id"} <= set(line), line
        assert line["time"].endswith("Z") and line["level"] in ("debug", "info", "warning", "error", "critical")
    events = [line for line in lines if line["event"]]

    def find(name: str, **fields) -> dict:
        for line in events:
            if line["event"] == name and all(line.get(k) == v for k, v in fields.items()):
                return line
        pytest.fail(f"no {name} {fields} in {[e['event'] for e in events]}")

    # a registration's outcome, logged on a domain thread, carries the HTTPS request's id (x-ms-request-id)
    assigned = find("registration.assigned", registration_id="obs-http-0")
    assert assigned["request_id"] == traffic.request_id and assigned["transport"] == "https"
    assert assigned["hub"] == "localhost" and assigned["outcome"] == "assigned"
    refused = find("registration.refused", registration_id="obs-http-0", reason="sas_invalid")
    assert refused["error_code"] == 401002 and refused["request_id"] not in (None, traffic.request_id)
    issued = find("certificate.issued", registration_id="obs-dev", policy="obs-ns/obs-p")
    assert len(issued["serial"]) >= 32 and issued["request_id"].startswith("m-")  # an MQTT connection's id
    connected = find("hub.connected", device_id="obs-dev", auth="certificateAuthority")
    assert connected["request_id"].startswith("m-")
    find("hub.refused", device_id="obs-ghost", reason="unknown_device", hub="localhost")
    # secrets never reach the log: the owner key, enrollment keys, any device SAS signature
    for secret in traffic.secrets:
        assert secret not in text and sas_unquoted(secret) not in text
    assert "SharedAccessKey=" not in text or "SharedAccessKey=<redacted>" in text


def sas_unquoted(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)
