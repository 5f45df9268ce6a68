"""The PKCS#11 token failing under a running ``opendps serve`` (real SoftHSM2, real sockets, PostgreSQL): its token
directory taken away and put back, many registrations signing on the one session at once, the token's PIN changed
underneath. A token that is away is a retryable refusal (HTTP 503 + Retry-After + Azure body, DPS MQTT res/503,
OCSP tryLater) with nothing half-written, told once in the log, and the server signs again by itself once the token
is back; a PIN the token refuses is not tried again (each wrong PIN counts toward the token locking itself).

The server has a SoftHSM2 configuration of its own (its own token directory, ``SOFTHSM2_CONF`` only in its
environment): taking it away touches neither this process's module nor the other modules' tokens. Skips locally
without SoftHSM2 / python-pkcs11 / PostgreSQL; mandatory in CI."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sqlalchemy import func, select
from tests.conftest import _run_server, database, installation
from tests.softhsm import PIN, make_softhsm, require_softhsm, session_softhsm  # noqa: F401 - the fixture
from tests.test_device_api import PREVIEW, chain_from, csr_b64, device_sas, namespace, openssl_verify_chain, put, svc
from tests.test_mqtt_hub import Client, dps_username
from tests.x509_helpers import p384_csr

from opendps.pki import KeyStore
from opendps.pki.pkcs11 import KeyUnavailable, Pkcs11Token
from opendps.pki.status import ca_ref
from opendps.store import CertificateAuthority, IssuedCertificate, Registration, Store, WrappedKey
from opendps.store.models import AuditEntry
from opendps.transport.sas import derive_device_key

pytestmark = pytest.mark.timeout(300, func_only=True)
TOKEN = "opendps-outage"
NS, POLICY, GROUP = "out-ns", "out-p", "out-fleet"
GROUP_KEY = base64.b64encode(bytes(range(21, 85))).decode()
PIN_ENV = "OPENDPS_PKCS11_PIN"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``opendps init --key-backend pkcs11`` (a subprocess: this process's module keeps its own configuration) and one
    ``opendps serve`` worker, on a SoftHSM2 token directory of their own."""
    require_softhsm()
    tmp = tmp_path_factory.mktemp("hsm-outage")
    hsm = make_softhsm(tmp / "softhsm", TOKEN)
    saved = {name: os.environ.get(name) for name in ("SOFTHSM2_CONF", PIN_ENV)}
    with database("postgresql", tmp) as db_url:
        env = {**os.environ, "OPENDPS_DATA_DIR": str(tmp / "data"), "OPENDPS_DB": db_url, PIN_ENV: PIN, **hsm.env}
        init = subprocess.run([sys.executable, "-m", "opendps", "init", "--key-backend", "pkcs11", "--pkcs11-module",
                               hsm.module, "--pkcs11-token-label", TOKEN], env=env, capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        os.environ.update({PIN_ENV: PIN, **hsm.env})  # what _run_server hands the server subprocess
        try:
            starting = _run_server(db_url, tmp, data_dir=tmp / "data", extra_args=("--workers", "1"))
            running = next(starting)
        finally:
            for name, value in saved.items():  # this process's module never sees the server's configuration
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        running.hsm, running.log = hsm, tmp / "server.log"
        running.tokens, running.csrs = hsm.directory / "tokens", tmp / "csr"
        with svc(running) as c:
            namespace(c, NS, POLICY)
            put(c, f"/enrollmentGroups/{GROUP}", {
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY,
                                                                         "secondaryKey": GROUP_KEY}},
                "credentialPolicyName": POLICY})
        yield running
        for _ in starting:  # stops the server
            pass


@contextmanager
def _token_away(server):
    """The token directory gone (a device pulled, a volume unmounted), put back on leaving."""
    away = server.tokens.with_name("tokens.away")
    server.tokens.rename(away)
    try:
        yield
    finally:
        away.rename(server.tokens)


@contextmanager
def _token_hung(server):
    """SoftHSM blocked: this process holds POSIX locks on every file of the token, so the server's next call into the
    token waits in the module (F_SETLKW) until they are released — a token that hangs, as a network HSM that stops
    answering does."""
    files = [path.open("r+b") for path in sorted(server.tokens.glob("*/*")) if path.is_file()]
    try:
        for f in files:
            fcntl.lockf(f, fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            f.close()  # releases its lock


def _device(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60)


def _register(server, rid: str) -> httpx.Response:
    with _device(server) as d:
        return d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                     json={"registrationId": rid, "csr": csr_b64(server.csrs / rid, rid)},
                     headers={"Authorization": device_sas(server.id_scope, rid, derive_device_key(GROUP_KEY, rid))})


def _assigned_chain(server, response: httpx.Response, rid: str) -> list[x509.Certificate]:
    assert response.status_code == 202 and response.json()["status"] == "assigned", response.text
    chain = chain_from(response.json()["registrationState"])
    openssl_verify_chain(server.csrs / rid, chain)  # the real openssl: the token's signatures verify
    return chain


def _written(server, rids: list[str]) -> dict[str, int]:
    """What the store holds for these registration ids: certificates, registrations, audit entries."""
    keys = [r.lower() for r in rids]
    store = Store(server.db_url)
    try:
        with store.session() as s:
            def count(model, *where) -> int:
                return s.scalar(select(func.count()).select_from(model).where(*where)) or 0

            return {"certificates": count(IssuedCertificate, IssuedCertificate.registration_id.in_(rids)),
                    "registrations": count(Registration, Registration.registration_key.in_(keys)),
                    "audit": count(AuditEntry, AuditEntry.device_id.in_(keys)),
                    "cas": count(CertificateAuthority), "keys": count(WrappedKey)}
    finally:
        store.dispose()


def _log_count(server, text: str) -> int:
    return server.log.read_text().count(text)


def _until(server, prefix: str, done: Callable[[httpx.Response], bool]) -> tuple[str, httpx.Response]:
    """Register new ids (a registration id has its own rate limit) until an answer is ``done`` — the token is tried
    again at most once a second while it is away — or a minute passed: the last id and its answer."""
    deadline = time.monotonic() + 60
    for attempt in range(10_000):
        rid = f"{prefix}-{attempt}"
        r = _register(server, rid)
        if done(r) or time.monotonic() > deadline:
            return rid, r
        time.sleep(0.25)
    raise AssertionError("unreachable")


def _assigned(r: httpx.Response) -> bool:
    return r.status_code != 503


def _ocsp(server, leaf: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPResponse:
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    r = httpx.post(f"http://127.0.0.1:{server.http_port}/ocsp", content=request.public_bytes(serialization.Encoding.DER),
                   headers={"Content-Type": "application/ocsp-request"}, timeout=30)
    assert r.status_code == 200, r.text
    return ocsp.load_der_ocsp_response(r.content)


def test_a_token_away_is_a_retryable_refusal_and_the_server_signs_again_once_it_is_back(server):
    leaf, ica, _ = _assigned_chain(server, _register(server, "out-before"), "out-before")
    before = _written(server, [])
    refused = ["out-away-1", "out-away-2", "out-away-3", "out-mqtt"]
    with _token_away(server):
        for rid in refused[:3]:
            r = _register(server, rid)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "5" and r.headers["x-ms-error-code"] == "503002"
            body = r.json()
            assert body["errorCode"] == 503002 and body["trackingId"] and body["timestampUtc"], body
            assert TOKEN in body["message"] and "Traceback" not in r.text, body
        # DPS over MQTT: the answer is res/503 with a retry-after
        d = Client(server, "out-mqtt", dps_username(server, "out-mqtt"),
                   password=device_sas(server.id_scope, "out-mqtt", derive_device_key(GROUP_KEY, "out-mqtt")))
        assert d.rc == 0
        d.subscribe("$dps/registrations/res/#")
        d.publish("$dps/registrations/PUT/iotdps-register/?$rid=r1",
                  json.dumps({"registrationId": "out-mqtt", "csr": csr_b64(server.csrs / "out-mqtt", "out-mqtt")}))
        topic, payload = d.expect("$dps/registrations/res/")
        d.close()
        assert topic == "$dps/registrations/res/503/?$rid=r1&retry-after=5", (topic, payload)
        assert json.loads(payload)["errorCode"] == 503002
        # OCSP: tryLater (RFC 6960: retryable), not internalError with a traceback
        assert _ocsp(server, leaf, ica).response_status == ocsp.OCSPResponseStatus.TRY_LATER
        # a rotation needs a new key on the token: refused, nothing made
        with svc(server) as c:
            r = c.post(f"/namespaces/{NS}/credentials/default/policies/{POLICY}/rotate")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
        # nothing half-written: no certificate, registration or audit entry for the refused, no CA or key row
        assert _written(server, refused) == {**before, "certificates": 0, "registrations": 0, "audit": 0}
    # the token is back: the server signs again by itself (no restart), within the token's next try
    rid, r = _until(server, "out-after", _assigned)
    chain = _assigned_chain(server, r, rid)
    assert chain[1] == ica
    assert _ocsp(server, leaf, ica).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    # the outage is told once when it began and once when it ended; no traceback, no line per refused request
    assert _log_count(server, f"PKCS#11 token '{TOKEN}' is unavailable") == 1
    assert _log_count(server, f"PKCS#11 token '{TOKEN}' answers again") == 1
    assert _log_count(server, "re-opening the session and retrying once") <= 1
    assert "Traceback" not in server.log.read_text()


def test_a_hung_token_holds_one_domain_thread_not_the_whole_server(server):
    """More registrations than the server has domain threads while a call into the token hangs: the one inside the
    module waits for the token, the others are refused (503 + Retry-After) once it has hung for STUCK_AFTER (5 s), so
    what needs no token (the management API) is still answered; the server signs again when the token returns."""
    _assigned_chain(server, _register(server, "out-hung-before"), "out-hung-before")
    rids = [f"out-hung-{i}" for i in range(12)]
    with ThreadPoolExecutor(len(rids)) as pool:
        with _token_hung(server):
            pending = [pool.submit(_register, server, rid) for rid in rids]
            with svc(server) as c:
                r = c.get(f"/namespaces/{NS}", timeout=30)  # old code: every domain thread waits for the token
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while sum(f.done() for f in pending) < len(rids) - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            refused = [f.result() for f in pending if f.done()]
            assert len(refused) == len(rids) - 1  # all but the one in the module
            for answer in refused:
                assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.text
                assert "has not answered a call" in answer.json()["message"]
        answers = [f.result() for f in pending]  # the token answers again: so does the call that waited for it
    assert [a.status_code for a in answers].count(202) == 1
    rid, r = _until(server, "out-hung-after", _assigned)
    _assigned_chain(server, r, rid)
    assert _log_count(server, "has not returned for") == 1
    assert _log_count(server, "the call that hung returned") == 1
    assert "Traceback" not in server.log.read_text()


def test_concurrent_registrations_and_ocsp_answers_share_the_token_session(server):
    """python-pkcs11 sessions are not thread-safe: every call takes the module's lock. Many registrations and OCSP
    answers signing at once all get signatures that verify (openssl), each under its own serial."""
    rids = [f"out-many-{i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda rid: _register(server, rid), rids))
        chains = [_assigned_chain(server, r, rid) for rid, r in zip(rids, answers, strict=True)]
        statuses = list(pool.map(lambda chain: _ocsp(server, chain[0], chain[1]), chains))
    assert len({chain[0].serial_number for chain in chains}) == len(rids)
    for chain, answer in zip(chains, statuses, strict=True):
        assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.serial_number == chain[0].serial_number
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        chain[1].public_key().verify(answer.signature, answer.tbs_response_bytes,
                                     ec.ECDSA(answer.signature_hash_algorithm))


def _change_pin(server, old: str, new: str) -> None:
    run = subprocess.run(["pkcs11-tool", "--module", server.hsm.module, "--token-label", TOKEN, "--login", "--pin",
                          old, "--change-pin", "--new-pin", new], env={**os.environ, **server.hsm.env},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_pin_the_token_refuses_is_not_tried_again(server):
    """The PIN changed on the token while the server is logged in: the next login (after the token was away) is
    refused, said once, and never tried again — the token counts wrong PINs and locks itself — even when the PIN is
    changed back: restarting with the right PIN is the operator's. (Last in the module: the server signs no more.)"""
    _assigned_chain(server, _register(server, "out-pin-before"), "out-pin-before")
    _change_pin(server, PIN, "9876-new")
    try:
        with _token_away(server):
            assert _register(server, "out-pin-away").status_code == 503
        # the token's next try logs in again: the token refuses the PIN
        rid, r = _until(server, "out-pin", lambda r: "wrong user PIN" in r.text)
        assert r.status_code == 503 and "wrong user PIN" in r.json()["message"], r.text
        assert r.headers["Retry-After"] == "5"
        assert _written(server, [rid])["certificates"] == 0
    finally:
        _change_pin(server, "9876-new", PIN)
    r = _register(server, "out-pin-restored")
    assert r.status_code == 503 and "restart opendps with the token's right PIN" in r.json()["message"], r.text
    assert _log_count(server, "does not take this process's PIN") == 1
    assert "9876-new" not in server.log.read_text() and PIN not in server.log.read_text()
    assert "Traceback" not in server.log.read_text()


@pytest.fixture
def db_url(tmp_path):
    """The in-process test below: SQLite (the server above runs on PostgreSQL)."""
    with database("sqlite", tmp_path) as url:
        yield url


def _ask(services, leaf: x509.Certificate, issuer: x509.Certificate, now: datetime) -> bytes:
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    return services.status.ocsp(request.public_bytes(serialization.Encoding.DER), now=now).der


def test_a_ca_key_that_cannot_sign_serves_the_last_crl_and_ocsp_answer_while_they_are_valid(
        session_softhsm, store, master_key):  # noqa: F811 - the fixture imported above
    """In-process, on the session's SoftHSM token: the issuing CA's key gone from the token after its CRL and an OCSP
    answer were signed. Past their refresh time (half their validity) but before their nextUpdate, nothing having
    changed, the signed ones are served again instead of a 503 or an OCSP internalError; an answer never signed is
    tryLater; past nextUpdate the CRL is the retryable 503."""
    token = Pkcs11Token(session_softhsm.config())
    token.open()
    keys = KeyStore(store, master_key, token=token, default_backend="pkcs11")
    keys.check_master_key()
    services = installation(store, keys)
    services.registry.create_namespace("stale-ns")
    issuer = services.registry.issuer(services.registry.get_policy("stale-ns", "default").policy_id)
    first = services.issuance.issue(issuer, p384_csr("stale-1"), "stale-1")
    second = services.issuance.issue(issuer, p384_csr("stale-2"), "stale-2")
    ica, ref, now = first.issuing_ca, ca_ref(first.issuing_ca), datetime.now(UTC)
    crl = services.status.crl(ref, now=now)
    answer = _ask(services, first.leaf, ica, now)
    assert ocsp.load_der_ocsp_response(answer).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    session_softhsm.tool("--delete-object", "--type", "privkey", "--label", keys.custody(issuer.key_id).label)
    assert crl.next_update is not None
    later = now + (crl.next_update - now) * 3 / 4  # past the refresh, before nextUpdate
    assert services.status.crl(ref, now=later).der == crl.der
    assert _ask(services, first.leaf, ica, later) == answer
    never = ocsp.load_der_ocsp_response(_ask(services, second.leaf, ica, later))
    assert never.response_status == ocsp.OCSPResponseStatus.TRY_LATER
    with pytest.raises(KeyUnavailable) as caught:
        services.status.crl(ref, now=crl.next_update)
    assert caught.value.status == 503 and caught.value.info["retryAfter"] == "5"
    token.close()
