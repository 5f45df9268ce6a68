"""Structured logging and the /metrics access rule without a server (issue 19): the redaction every log line goes
through, the JSON line's fields, the request id carried into the domain thread pool, and who may scrape ``/metrics``
without credentials (the SAS middleware, in-process over loopback)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer

from opendps import logs
from opendps.frontends import build
from opendps.frontends.metrics import is_loopback
from opendps.frontends.runtime import DomainRunner
from opendps.transport import sas


@pytest.mark.parametrize("line, secret", [
    ("Authorization: SharedAccessSignature sr=h%2Fdevices%2Fd&sig=AbC%2Bdef%3D&se=1&skn=owner", "AbC%2Bdef%3D"),
    ("HostName=h;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=c2VjcmV0a2V5c2VjcmV0", "c2VjcmV0a2V5c2VjcmV0"),
    ('{"attestation": {"symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}}}',
     "cHJpbWFyeQ=="),
    ("pin=123456 for token opendps", "123456"),
    ("postgresql+psycopg://opendps:hunter2@db.example/opendps", "hunter2"),
    ("Endpoint=x;SharedAccessSignature=c2lnbmF0dXJl", "c2lnbmF0dXJl"),
    ("password: hunter3", "hunter3"), ("PASSWD=hunter4", "hunter4"), ("'Secret': 's3cr3t'", "s3cr3t"),
    ("apiKey=a1b2c3", "a1b2c3"), ("token=t0k3n", "t0k3n"),
    ("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----",
     "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"),
])
def test_secrets_are_redacted_from_every_line(line, secret):
    assert secret not in logs.redact(line)
    assert "<redacted" in logs.redact(line)


def test_plain_text_is_left_alone():
    text = "registration 'dev-1' refused (401002): SharedAccessSignature signature does not verify"
    assert logs.redact(text) == text


def _formatted(formatter: logging.Formatter, message: str, *args, **extra) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("opendps.test-observability")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info(message, *args, extra=extra or None)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_json_line_has_stable_fields_and_the_request_id():
    token = logs.REQUEST_ID.set("req-1")
    try:
        line = _formatted(logs.JsonFormatter(worker=1), "device %r refused with %s", "d1",
                          "sig=c2VjcmV0", **logs.event("hub.refused", device_id="d1", reason="sas_invalid",
                                                       error_code=401002))
    finally:
        logs.REQUEST_ID.reset(token)
    data = json.loads(line)
    assert list(data)[:6] == ["time", "level", "logger", "event", "message", "request_id"]
    assert data["event"] == "hub.refused" and data["request_id"] == "req-1" and data["level"] == "info"
    assert (data["device_id"], data["reason"], data["error_code"], data["worker"]) == ("d1", "sas_invalid", 401002, 1)
    assert "c2VjcmV0" not in line and data["time"].endswith("Z")
    plain = json.loads(_formatted(logs.JsonFormatter(), "no event"))
    assert plain["event"] is None and plain["request_id"] is None and "worker" not in plain
    assert "c2VjcmV0" not in _formatted(logs.RedactingFormatter("%(message)s"), "token sig=c2VjcmV0&se=1")
    with pytest.raises(ValueError, match="not in opendps.logs.FIELDS"):
        logs.event("x", sas_token="nope")


def test_a_configured_process_gathers_only_what_its_lines_show(monkeypatch, capsys):
    """configure() turns off what neither format prints (the caller's file and line, a walk up the stack per record;
    thread and process names): a third of a line's cost. The pid stays (``--workers`` lines show it)."""
    for flag in ("_srcfile", "logThreads", "logMultiprocessing", "logProcesses"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))  # restored after the test
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    logs.configure("json", worker=2)
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("opendps.test-configured")
    logger.addFilter(lambda r: records.append(r) or True)
    logger.info("device %r connected", "d1", extra=logs.event("hub.connected", device_id="d1"))
    (record,) = records
    assert (record.funcName, record.lineno, record.threadName, record.processName) == ("(unknown function)", 0, None, None)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "device 'd1' connected" and line["pid"] == os.getpid() and line["worker"] == 2


def test_the_request_id_reaches_the_domain_thread():
    async def main() -> str | None:
        runner = DomainRunner(workers=1)
        logs.REQUEST_ID.set("abc123")
        try:
            return await runner.run(logs.REQUEST_ID.get)
        finally:
            runner.close()

    assert asyncio.run(main()) == "abc123"
    assert logs.accept_request_id("client-1.2:3") == "client-1.2:3"
    assert logs.accept_request_id("x\ny") is None and logs.accept_request_id("a" * 65) is None


def test_what_counts_as_a_loopback_scraper():
    assert is_loopback("127.0.0.1", {}) and is_loopback("::1", {}) and is_loopback("::ffff:127.0.0.1", {})
    assert not is_loopback("10.0.0.8", {}) and not is_loopback("203.0.113.7", {}) and not is_loopback(None, {})
    assert not is_loopback("127.0.0.1", {"X-Forwarded-For": "203.0.113.7"})  # a proxy on this machine
    assert not is_loopback("127.0.0.1", {"Forwarded": "for=203.0.113.7"})
    assert not is_loopback("not-an-address", {})


def test_metrics_over_the_https_app_without_credentials_only_from_loopback(services):
    """The SAS middleware in-process (a loopback client): no token is needed unless a proxy forwarded the request;
    a token without ServiceConfig is refused; /status always needs one."""
    from opendps.provisioning.access import ENROLLMENT_READ

    services.access_policies.put("reader", ENROLLMENT_READ)
    reader_key = services.access_policies.keys_of("reader")[0]

    async def main() -> dict[str, int]:
        fe = build(services, service_hosts={"localhost"})
        client = TestClient(TestServer(fe.http))
        await client.start_server()
        try:
            host = "localhost"
            reader = sas.generate(host, reader_key, key_name="reader")
            answers = {
                "loopback": (await client.get("/metrics")).status,
                "forwarded": (await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})).status,
                "reader": (await client.get("/metrics", headers={"Authorization": reader})).status,
                "status": (await client.get("/status")).status,
            }
            text = await (await client.get("/metrics")).text()
            assert "opendps_domain_call_duration_seconds" in text or "opendps_hub_connections" in text
            return answers
        finally:
            await client.close()
            fe.runtime.domain.close()

    assert asyncio.run(main()) == {"loopback": 200, "forwarded": 401, "reader": 401, "status": 401}


def test_issuance_and_revocation_log_their_events(services, caplog):
    """The CA's outcome lines (pki, in the domain): certificate.issued and certificate.revoked with serial and reason."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    services.registry.create_namespace("log-ns")
    issuer = services.registry.issuer(services.registry.get_policy("log-ns", "default").policy_id)
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                             "log-dev")]))
           .sign(key, hashes.SHA384()).public_bytes(Encoding.DER))
    seen: list[tuple[str, float]] = []
    services.issuance.observer = lambda issuer, seconds: seen.append((issuer.label, seconds))
    with caplog.at_level(logging.INFO, logger="opendps.pki"):
        chain = services.issuance.issue(issuer, csr, "log-dev")
        services.issuance.revoke(format(chain.leaf.serial_number, "x"), "keyCompromise")
    events = {r.event: r for r in caplog.records if getattr(r, "event", None)}
    issued, revoked = events["certificate.issued"], events["certificate.revoked"]
    assert issued.policy == "log-ns/default" and issued.registration_id == "log-dev"
    assert issued.serial == revoked.serial and revoked.reason == "keyCompromise"
    assert [label for label, _ in seen] == ["log-ns/default"] and seen[0][1] > 0


def test_a_killed_supervisors_metrics_directory_is_removed_at_the_next_start(tmp_path):
    """A supervisor killed with SIGKILL leaves its multiprocess directory; the next one removes the directories
    whose supervisor (named by pid) is gone, and keeps those of live processes and what is not one of them."""
    import os
    import subprocess

    from opendps.frontends.metrics import remove_orphaned_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: no process has its pid now
    orphan = tmp_path / f"opendps-metrics-{gone.pid}-abc"
    alive = tmp_path / f"opendps-metrics-{os.getpid()}-def"
    other = tmp_path / "opendps-metrics-notapid-ghi"
    for d in (orphan, alive, other):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    (tmp_path / f"opendps-metrics-{gone.pid}-file").write_text("not a directory")
    assert remove_orphaned_dirs(tmp_path) == [orphan]
    assert not orphan.exists() and alive.exists() and other.exists()
