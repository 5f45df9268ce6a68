"""CA keys on a PKCS#11 token, end to end over real sockets (issue 18): ``opendps init --key-backend pkcs11`` on
SoftHSM2, one ``opendps serve`` for the module (PostgreSQL; the in-process tests run on SQLite), the seed flow with
both CA keys on the token — provision over HTTPS with a CSR, mTLS to the hub, renewal, a policy rotation, the CRL —
what pkcs11-tool shows on the token, no private material in the database, and the failures: a wrong PIN, a missing
token or module at start, a key deleted from the token while serving (503 + Azure body, nothing written).
Skips locally without SoftHSM2 / python-pkcs11 / PostgreSQL; mandatory in CI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from sqlalchemy import func, select
from tests.conftest import _run_server, database, free_ports, invoke_cli
from tests.softhsm import E2E_TOKEN, PIN, session_softhsm  # noqa: F401 - the fixture
from tests.test_device_api import PREVIEW, csr_b64, device_sas, namespace, put, svc, sym_key
from tests.test_mqtt_hub import Client, hub_username, write_pem

from opendps.store import IssuedCertificate, Registration, Store, WrappedKey

pytestmark = pytest.mark.timeout(300, func_only=True)
PIN_ENV = "OPENDPS_PKCS11_PIN"
NS, POLICY, GROUP = "hsm-ns", "hsm-p", "hsm-fleet"
GROUP_KEY = base64.b64encode(bytes(range(11, 75))).decode()


@pytest.fixture(scope="module")
def hsm_server(session_softhsm, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """``opendps init --key-backend pkcs11`` then ``opendps serve --workers 2`` on the SoftHSM2 token ``E2E_TOKEN``."""
    hsm = session_softhsm
    tmp = tmp_path_factory.mktemp("hsm-server")
    saved = os.environ.get(PIN_ENV)
    os.environ[PIN_ENV] = PIN  # the server subprocess's environment is this one's
    try:
        with database("postgresql", tmp) as db_url:
            env = {**os.environ, "OPENDPS_DATA_DIR": str(tmp / "data"), "OPENDPS_DB": db_url}
            init = invoke_cli(env, "init", "--key-backend", "pkcs11", "--pkcs11-module", hsm.module,
                              "--pkcs11-token-label", E2E_TOKEN)
            assert init.returncode == 0, init.stderr
            # two workers: each opens the module and logs in itself (spawned processes, one session each)
            for server in _run_server(db_url, tmp, data_dir=tmp / "data", extra_args=("--workers", "2")):
                server.hsm = hsm
                yield server
    finally:
        if saved is None:
            os.environ.pop(PIN_ENV, None)
        else:
            os.environ[PIN_ENV] = saved


def _cli_json(server, *args: str) -> dict:
    proc = server.cli(*args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ca_config(policy: dict) -> dict:
    return policy["properties"]["certificate"]["certificateAuthorityConfiguration"]


def _token_labels(server, kind: str = "Private Key Object") -> list[str]:
    return [o["label"] for o in server.hsm.objects(E2E_TOKEN) if o["kind"].startswith(kind)]


def _store_rows(server, model, *where):
    store = Store(server.db_url)
    try:
        with store.session() as s:
            return s.execute(select(model).where(*where)).scalars().all() if model is WrappedKey else \
                s.scalar(select(func.count()).select_from(model).where(*where))
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def fleet(hsm_server):
    with svc(hsm_server) as c:
        namespace(c, NS, POLICY)
        put(c, f"/enrollmentGroups/{GROUP}", {
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
            "credentialPolicyName": POLICY})
    return GROUP_KEY


def _provision(server, rid: str, tmp_path) -> tuple[dict, list[x509.Certificate]]:
    """``opendps device provision`` over HTTPS with a CSR for a key made on the device."""
    from opendps.transport.sas import derive_device_key

    store = tmp_path / rid
    proc = server.cli("device", "provision", "--registration-id", rid, "--symmetric-key",
                      derive_device_key(GROUP_KEY, rid), "--store-dir", str(store), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "assigned" and doc["transport"] == "https"
    return doc, x509.load_pem_x509_certificates((store / "fullchain.pem").read_bytes())


def test_the_seed_flow_with_both_ca_keys_on_the_token(hsm_server, fleet, tmp_path):
    server = hsm_server
    credential = _cli_json(server, "adr", "ns", "credential", "show", "--ns", NS)["properties"]
    policy = _cli_json(server, "adr", "ns", "policy", "show", "--ns", NS, "-n", POLICY)
    ca = _ca_config(policy)
    assert (credential["keyBackend"], credential["tokenLabel"]) == ("pkcs11", E2E_TOKEN)
    assert (ca["keyBackend"], ca["tokenLabel"]) == ("pkcs11", E2E_TOKEN)
    assert {credential["keyLabel"], ca["keyLabel"]} <= set(_token_labels(server))
    # a device provisions over HTTPS with a CSR: the chain is the token's root and issuing CA
    rid = "hsm-dev-1"
    _, (leaf, ica, root) = _provision(server, rid, tmp_path)
    leaf.verify_directly_issued_by(ica)
    ica.verify_directly_issued_by(root)
    assert ica.public_bytes(serialization.Encoding.PEM).decode() == ca["certificate"]
    # ... and connects to the hub with mutual TLS
    d = Client(server, rid, hub_username(rid), cert=tmp_path / rid / "fullchain.pem", key=tmp_path / rid / "device.key")
    assert d.rc == 0
    # renewal through the hub: the new leaf is signed on the token too
    d.subscribe("$iothub/credentials/res/#")
    d.publish("$iothub/credentials/POST/issueCertificate/?$rid=req-0001",
              json.dumps({"id": rid, "csr": csr_b64(tmp_path / "renew", rid)}))
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/202/?$rid=req-0001", payload
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/200/?$rid=req-0001", payload
    renewed = [x509.load_der_x509_certificate(base64.b64decode(b)) for b in json.loads(payload)["certificates"]]
    d.close()
    renewed[0].verify_directly_issued_by(ica)
    assert renewed[0].serial_number != leaf.serial_number
    again = Client(server, rid, hub_username(rid), cert=write_pem(tmp_path / "renewed.pem", renewed[:2]),
                   key=tmp_path / "renew" / f"{rid}-op.key")
    assert again.rc == 0
    again.close()
    # the issuing CA's CRL (plain HTTP, as the leaf names it) is signed on the token
    url = leaf.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value[0].full_name[0].value
    crl = x509.load_der_x509_crl(httpx.get(url.replace("localhost", "127.0.0.1"), timeout=30).content)
    assert crl.is_signature_valid(ica.public_key())
    # the renewed certificate's first session superseded the first one: listed, and so says the OCSP answer, signed
    # on the token too
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp

    ocsp_url = next(d.access_location.value for d in leaf.extensions.get_extension_for_class(
        x509.AuthorityInformationAccess).value if d.access_method == x509.oid.AuthorityInformationAccessOID.OCSP)
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, ica, hashes.SHA1()).build()
    answer = ocsp.load_der_ocsp_response(httpx.post(
        ocsp_url.replace("localhost", "127.0.0.1"), content=request.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"}, timeout=30).content)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.superseded
    ica.public_key().verify(answer.signature, answer.tbs_response_bytes,
                            ec.ECDSA(answer.signature_hash_algorithm))
    # a rotation makes the new issuing CA's key on the token; the next device gets it
    rotated = _ca_config(_cli_json(server, "adr", "ns", "policy", "rotate", "--ns", NS, "-n", POLICY))
    assert rotated["keyBackend"] == "pkcs11" and rotated["keyLabel"] != ca["keyLabel"]
    assert rotated["keyLabel"] in _token_labels(server)
    _, (leaf2, ica2, root2) = _provision(server, "hsm-dev-2", tmp_path)
    assert ica2.public_bytes(serialization.Encoding.PEM).decode() == rotated["certificate"] and root2 == root
    leaf2.verify_directly_issued_by(ica2)
    ica2.verify_directly_issued_by(root)


def test_the_token_holds_the_keys_private_sensitive_never_extractable(hsm_server, fleet):
    server = hsm_server
    rows = [r for r in _store_rows(server, WrappedKey) if r.backend == "pkcs11"]
    assert len(rows) >= 3  # the server CA, the namespace root, its issuing CA(s)
    assert all(bytes(r.blob) == b"" and r.pkcs11_token == E2E_TOKEN for r in rows)  # no private material stored
    listed = server.hsm.objects(E2E_TOKEN)
    private = {o["label"]: o for o in listed if o["kind"].startswith("Private Key Object; EC")}
    assert {r.pkcs11_label for r in rows} <= set(private)
    for row in rows:
        obj = private[row.pkcs11_label]
        access = [a.strip() for a in obj["Access"].split(",")]
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= set(access), obj
        assert "extractable" not in access, obj  # pkcs11-tool says "extractable" for CKA_EXTRACTABLE=true
        assert [u.strip() for u in obj["Usage"].split(",")] == ["sign"], obj
        assert obj["ID"] == row.pkcs11_id
    # CKA_PRIVATE: without logging in the token shows the public halves only
    public_view = server.hsm.objects(E2E_TOKEN, login=False)
    assert public_view and not [o for o in public_view if o["kind"].startswith("Private Key Object")]
    # and nothing reads a private value out: C_GetAttributeValue(CKA_VALUE) is refused
    import pkcs11

    from opendps.pki.pkcs11 import Pkcs11Token

    token = Pkcs11Token(server.hsm.config(E2E_TOKEN))
    session = token._session_here()
    key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=rows[0].pkcs11_label)
    with pytest.raises(pkcs11.AttributeSensitive):
        key[pkcs11.Attribute.VALUE]


def test_software_keys_per_namespace_and_per_policy(hsm_server):
    server = hsm_server
    soft = _cli_json(server, "adr", "ns", "create", "--name", "hsm-soft-ns", "--key-backend", "software")
    assert soft["name"] == "hsm-soft-ns"
    assert _cli_json(server, "adr", "ns", "credential", "show", "--ns", "hsm-soft-ns")["properties"]["keyBackend"] \
        == "software"
    # root on the token, this policy's issuing CA in software (for speed), and back on the token by a rotation
    made = _ca_config(_cli_json(server, "adr", "ns", "policy", "create", "--ns", NS, "-n", "hsm-fast",
                                "--key-backend", "software"))
    assert made["keyBackend"] == "software" and made.get("keyLabel") is None
    moved = _ca_config(_cli_json(server, "adr", "ns", "policy", "rotate", "--ns", NS, "-n", "hsm-fast",
                                 "--key-backend", "pkcs11"))
    assert moved["keyBackend"] == "pkcs11" and moved["keyLabel"] in _token_labels(server)
    bad = server.cli("adr", "ns", "policy", "create", "--ns", NS, "-n", "hsm-bad", "--key-backend", "tpm")
    assert bad.returncode != 0


def test_a_key_deleted_from_the_token_refuses_the_registration_with_503(hsm_server, fleet, tmp_path):
    server = hsm_server
    with svc(server) as c:
        namespace(c, "hsm-gone-ns", "hsm-gone-p")
        keys = {rid: sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                        "credentialPolicyName": "hsm-gone-p"})
                for rid in ("hsm-gone-1", "hsm-gone-2")}
        label = _ca_config(c.get("/namespaces/hsm-gone-ns/credentials/default/policies/hsm-gone-p").json())["keyLabel"]
    with _device(server) as d:  # the first signs: the server now holds the key's handle
        r = _register(server, d, "hsm-gone-1", keys["hsm-gone-1"], tmp_path)
        assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    server.hsm.tool("--delete-object", "--type", "privkey", "--label", label, label=E2E_TOKEN)
    with _device(server) as d:
        r = _register(server, d, "hsm-gone-2", keys["hsm-gone-2"], tmp_path)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["errorCode"] == 503002 and "is not on PKCS#11 token" in body["message"] and body["trackingId"]
    assert "Traceback" not in r.text
    assert _store_rows(server, IssuedCertificate, IssuedCertificate.registration_id == "hsm-gone-2") == 0
    assert _store_rows(server, Registration, Registration.registration_key == "hsm-gone-2") == 0
    # the server goes on: the other policies' keys still sign
    from opendps.transport.sas import derive_device_key

    with _device(server) as d:
        r = _register(server, d, "hsm-after-gone", derive_device_key(fleet, "hsm-after-gone"), tmp_path)
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text


def _device(server) -> httpx.Client:
    import ssl

    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60)


def _register(server, client: httpx.Client, rid: str, key: str, tmp_path) -> httpx.Response:
    return client.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                      json={"registrationId": rid, "csr": csr_b64(tmp_path / rid, rid)},
                      headers={"Authorization": device_sas(server.id_scope, rid, key)})


def _fails_in_one_line(proc, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_wrong_pin_stops_serve_at_start(hsm_server):
    server = hsm_server
    ports = [str(p) for p in free_ports(4)]
    proc = invoke_cli({**server.env, PIN_ENV: "not-the-pin"}, "serve", "--https-port", ports[0], "--mqtt-port",
                      ports[1], "--amqp-port", ports[2], "--http-port", ports[3])
    _fails_in_one_line(proc, "wrong user PIN", E2E_TOKEN)
    assert "not-the-pin" not in proc.stderr


def test_a_missing_token_or_module_stops_init(session_softhsm, tmp_path):  # noqa: F811
    hsm = session_softhsm
    env = {**os.environ, "OPENDPS_DATA_DIR": str(tmp_path / "data"), PIN_ENV: PIN}
    env.pop("OPENDPS_DB", None)
    _fails_in_one_line(invoke_cli(env, "init", "--key-backend", "pkcs11", "--pkcs11-module", hsm.module,
                                  "--pkcs11-token-label", "no-such-token"), "'no-such-token' is not present")
    assert not (tmp_path / "data").exists()  # nothing half-made
    _fails_in_one_line(invoke_cli(env, "init", "--key-backend", "pkcs11", "--pkcs11-module", "/nonexistent/p11.so",
                                  "--pkcs11-token-label", E2E_TOKEN), "/nonexistent/p11.so does not exist")
    _fails_in_one_line(invoke_cli({k: v for k, v in env.items() if k != PIN_ENV}, "init", "--key-backend", "pkcs11",
                                  "--pkcs11-module", hsm.module, "--pkcs11-token-label", E2E_TOKEN), PIN_ENV)


def test_the_hsm_bench_scenario_runs(session_softhsm):  # noqa: F811 - SoftHSM2 present (skips or fails otherwise)
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--scenario", "hsm-issue", "--count", "5",
                           "--no-lint", "-o", "json"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert [(r["transport"], r["concurrency"], r["ok"], r["errors"]) for r in rows] == [
        ("software", 1, 5, 0), ("software", 4, 5, 0), ("pkcs11", 1, 5, 0), ("pkcs11", 4, 5, 0)]
    assert all(r["ratios"].get("software") for r in rows if r["transport"] == "pkcs11")
