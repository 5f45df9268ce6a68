"""DPS device API over real HTTPS on loopback (issue 3), against ``opendps serve`` on SQLite and PostgreSQL.

X.509 devices present their chain in the TLS handshake (stdlib ssl client, ``load_cert_chain``);
symmetric-key devices send Azure's SharedAccessSignature. The seed's flow uses the seed's own
openssl commands; other hierarchies are made with ``cryptography`` (fast EC keys) so that each test
owns its CA and groups cannot shadow each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import ssl
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import func, select
from tests.conftest import _run_server, database, invoke_cli, run_openssl
from tests.seed import DEVICE_EXT, INTERMEDIATE_EXT
from tests.seed import REGISTRATION_ID as SEED_ID
from tests.x509_helpers import Ca, _name, make_ca, make_leaf

from opendps.store import IssuedCertificate, Store
from opendps.transport import sas

PREVIEW = "2025-07-01-preview"
pytestmark = pytest.mark.timeout(300, func_only=True)


# ---------------------------------------------------------------- PKI helpers
def write_identity(directory: Path, name: str, certs: list[x509.Certificate], key) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def csr_b64(directory: Path, cn: str, curve: str = "P-384") -> str:
    """A CSR made by the real openssl CLI, as the seed's device would (base64 DER, no PEM armour)."""
    directory.mkdir(parents=True, exist_ok=True)
    run_openssl("req", "-new", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{curve}", "-nodes",
                "-keyout", str(directory / f"{cn}-op.key"), "-subj", f"/CN={cn}", "-outform", "DER",
                "-out", str(directory / f"{cn}.csr.der"))
    return base64.b64encode((directory / f"{cn}.csr.der").read_bytes()).decode()


# ---------------------------------------------------------------- API helpers
def svc(server) -> httpx.Client:
    conn = sas.parse_connection_string(server.connection_string)
    token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"])
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                        headers={"Authorization": token}, timeout=60)


def device(server, cert_file: Path | None = None, key_file: Path | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=server.ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return httpx.Client(base_url=server.url, verify=ctx, timeout=60)


def device_sas(scope: str, rid: str, key: str, *, ttl: int = 3600, lower_hex: bool = False) -> str:
    """Azure's device token; ``lower_hex`` encodes '/' as %2f and signs that, as the C SDK does."""
    if not lower_hex:
        return sas.generate(f"{scope}/registrations/{rid}", key, "registration", ttl=ttl)
    sr, se = quote(f"{scope}/registrations/{rid}", safe="").replace("%2F", "%2f"), int(time.time()) + ttl
    sig = quote(sas.sign(key, sr + "\n" + str(se)), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"


def register(server, client: httpx.Client, rid: str, *, headers: dict | None = None, body: dict | None = None,
             api_version: str = PREVIEW) -> tuple[httpx.Response, dict | None]:
    """PUT register (and poll once when answered 202); returns (PUT response, final operation status or None).

    The answer is always 202 (the C# SDK refuses anything else): a registration complete at once carries its final
    state in that body without Retry-After (issue 13); a slower one is ``assigning`` + Retry-After, then polled."""
    r = client.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": api_version},
                   json=body if body is not None else {"registrationId": rid, "payload": None}, headers=headers)
    assert r.status_code != 200, "register is answered 202, never 200 (C# SDK RuntimeRegistration.RegisterDevice)"
    if r.status_code != 202:
        return r, None
    if r.json()["status"] != "assigning":  # (that the operation stays pollable: MQTT and the raw-client test)
        assert r.json()["status"] == "assigned" and "Retry-After" not in r.headers, r.text
        return r, r.json()
    assert r.headers["Retry-After"] == "2"
    assert r.json()["status"] == "assigning"
    op = r.json()["operationId"]
    g = client.get(f"/{server.id_scope}/registrations/{rid}/operations/{op}", params={"api-version": api_version},
                   headers=headers)
    assert g.status_code == 200, g.text
    assert g.json()["operationId"] == op
    return r, g.json()


def assert_azure_error(resp: httpx.Response, status: int, words: str = "", code: int | None = None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert {"errorCode", "trackingId", "message", "timestampUtc"} <= set(body)
    assert body["errorCode"] // 1000 == status and resp.headers["x-ms-error-code"] == str(body["errorCode"])
    if code is not None:
        assert body["errorCode"] == code
    assert words.lower() in body["message"].lower(), body["message"]


def issued_count(server, rid: str) -> int:
    store = Store(server.db_url)
    try:
        with store.session() as s:
            return s.scalar(select(func.count()).select_from(IssuedCertificate)
                            .where(IssuedCertificate.registration_id == rid)) or 0
    finally:
        store.dispose()


def assert_nothing_left(server, rid: str, hub: str = "default") -> None:
    with svc(server) as c:
        assert c.get(f"/registrations/{rid}").status_code == 404
        assert c.get(f"/linkedHubs/{hub}/devices/{rid}").status_code == 404
    assert issued_count(server, rid) == 0


def upload_verified(server, c: httpx.Client, name: str, ca: Ca) -> None:
    r = c.put(f"/certificates/{name}", json={"properties": {"certificate": ca.pem}})
    assert r.status_code == 201, r.text
    r = c.post(f"/certificates/{name}/generateVerificationCode", headers={"If-Match": r.json()["etag"]})
    code = r.json()["properties"]["verificationCode"]
    proof, _ = make_leaf(code, ca)
    r = c.post(f"/certificates/{name}/verify", headers={"If-Match": r.json()["etag"]},
               json={"certificate": proof.public_bytes(serialization.Encoding.PEM).decode()})
    assert r.json()["properties"]["isVerified"] is True, r.text


def namespace(c: httpx.Client, ns: str, policy: str, days: int = 7) -> None:
    r = c.put(f"/namespaces/{ns}", json={"properties": {"policyName": policy, "validityPeriodInDays": days}})
    assert r.status_code == 201, r.text


def put(c: httpx.Client, path: str, doc: dict, status: int = 201) -> dict:
    r = c.put(path, json=doc)
    assert r.status_code == status, r.text
    return r.json()


def sym_key(c: httpx.Client, path: str, doc: dict) -> str:
    """Create a symmetric-key enrollment (or group); return its server-generated primary key."""
    return put(c, path, doc)["attestation"]["symmetricKey"]["primaryKey"]


def chain_from(state: dict) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]


def openssl_verify_chain(directory: Path, chain: list[x509.Certificate]) -> None:
    names = ["leaf.pem", "ica.pem", "root.pem"]
    for name, cert in zip(names, chain, strict=True):
        (directory / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = run_openssl("verify", "-CAfile", str(directory / "root.pem"), "-untrusted", str(directory / "ica.pem"),
                      str(directory / "leaf.pem"))
    assert out.stdout.strip().endswith("OK")


# ---------------------------------------------------------------- the seed's PKI (openssl, as printed in the seed)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """Seed steps 2 and 6: RSA-4096 root and intermediate, RSA-2048 device bootstrap certificate and chain files."""
    d = tmp_path_factory.mktemp("seed")
    procs = [subprocess.Popen(["openssl", *args], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for args in (
        ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:4096", "-keyout", "root-ca.key", "-out", "root-ca.pem",
         "-days", "3650", "-sha256", "-subj", f"/CN={SEED_ID}-root",
         "-addext", "basicConstraints=critical,CA:true,pathlen:1", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash", "-addext", "authorityKeyIdentifier=keyid:always"],
        ["genrsa", "-out", "intermediate-ca.key", "4096"],
        ["genrsa", "-out", "device.key", "2048"])]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    run_openssl("req", "-new", "-key", "intermediate-ca.key", "-out", "intermediate-ca.csr",
                "-subj", f"/CN={SEED_ID}-intermediate", cwd=d)
    (d / "intermediate-ext.cnf").write_text(INTERMEDIATE_EXT)
    run_openssl("x509", "-req", "-in", "intermediate-ca.csr", "-CA", "root-ca.pem", "-CAkey", "root-ca.key",
                "-CAcreateserial", "-out", "intermediate-ca.pem", "-days", "1825", "-sha256",
                "-extfile", "intermediate-ext.cnf", "-extensions", "v3_intermediate", cwd=d)
    run_openssl("req", "-new", "-key", "device.key", "-out", "device.csr", "-subj", f"/CN={SEED_ID}", cwd=d)
    (d / "device-ext.cnf").write_text(DEVICE_EXT)
    run_openssl("x509", "-req", "-in", "device.csr", "-CA", "intermediate-ca.pem", "-CAkey", "intermediate-ca.key",
                "-out", "device.pem", "-days", "365", "-sha256", "-extfile", "device-ext.cnf", "-extensions", "v3_req", cwd=d)
    (d / "device-full-chain.pem").write_text("".join((d / f).read_text() for f in
                                                     ("device.pem", "intermediate-ca.pem", "root-ca.pem")))
    return d


def _openssl_proof(seed: Path, code: str, ca: str, workdir: Path) -> str:
    """Seed steps 4/5: a verification certificate with CN = code, signed by the CA's key."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_openssl("genrsa", "-out", "verification.key", "2048", cwd=workdir)
    run_openssl("req", "-new", "-key", "verification.key", "-out", "verification.csr", "-subj", f"/CN={code}", cwd=workdir)
    run_openssl("x509", "-req", "-in", "verification.csr", "-CA", str(seed / f"{ca}.pem"), "-CAkey", str(seed / f"{ca}.key"),
                "-CAcreateserial", "-out", "verification.pem", "-days", "1", "-sha256", cwd=workdir)
    return (workdir / "verification.pem").read_text()


# ---------------------------------------------------------------- the seed's flow end to end
def test_seed_flow_x509_group_on_intermediate_with_csr(server, seed, tmp_path):
    with svc(server) as c:
        for name, ca in ((f"{SEED_ID}-root", "root-ca"), (f"{SEED_ID}-intermediate", "intermediate-ca")):
            r = c.put(f"/certificates/{name}", json={"properties": {"certificate": (seed / f"{ca}.pem").read_text()}})
            assert r.status_code == 201, r.text
            r = c.post(f"/certificates/{name}/generateVerificationCode", headers={"If-Match": r.json()["etag"]})
            proof = _openssl_proof(seed, r.json()["properties"]["verificationCode"], ca, tmp_path / ca)
            r = c.post(f"/certificates/{name}/verify", headers={"If-Match": r.json()["etag"]}, json={"certificate": proof})
            assert r.json()["properties"]["isVerified"] is True
        namespace(c, "seed-ns", "default", days=5)
        twin = {"tags": {"line": "skittles"}, "properties": {"desired": {"telemetryInterval": 30}}}
        group = put(c, "/enrollmentGroups/seed-group", {
            "enrollmentGroupId": "seed-group", "provisioningStatus": "enabled", "credentialPolicyName": "default",
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": f"{SEED_ID}-intermediate"}}},
            "initialTwin": twin})
        assert group["attestation"]["x509"]["caReferences"]["primary"] == f"{SEED_ID}-intermediate"

    csr = csr_b64(tmp_path, SEED_ID)
    with device(server, seed / "device-full-chain.pem", seed / "device.key") as d:
        _, result = register(server, d, SEED_ID, body={"registrationId": SEED_ID, "csr": csr})
    state = result["registrationState"]
    assert result["status"] == "assigned" and state["status"] == "assigned"
    assert state["assignedHub"] == "localhost" and state["deviceId"] == SEED_ID
    assert state["substatus"] == "initialAssignment"
    assert state["x509"]["enrollmentGroupId"] == "seed-group"
    assert state["x509"]["signingCertificateInfo"]["subjectName"] == f"CN={SEED_ID}-intermediate"
    chain = chain_from(state)
    openssl_verify_chain(tmp_path, chain)
    leaf = chain[0]
    assert leaf.subject == _name(SEED_ID)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=5)
    op_key = serialization.load_pem_private_key((tmp_path / f"{SEED_ID}-op.key").read_bytes(), None)
    assert leaf.public_key().public_numbers() == op_key.public_key().public_numbers()

    with svc(server) as c:
        dev = c.get(f"/linkedHubs/default/devices/{SEED_ID}").json()
        assert dev["tags"] == twin["tags"] and dev["authenticationType"] == "certificateAuthority"
        assert dev["properties"]["desired"]["telemetryInterval"] == 30
        rec = c.get(f"/namespaces/seed-ns/devices/{SEED_ID}").json()
        assert rec["properties"]["iotHubHostName"] == "localhost"
        assert rec["properties"]["operationalCertificate"]["serialNumber"] == f"{leaf.serial_number:032X}"
        trusted = [x509.load_pem_x509_certificate(t["properties"]["certificate"].encode())
                   for t in c.get("/linkedHubs/default/certificates").json()["value"]]
        assert chain[1] in trusted
        reg = c.get(f"/registrations/{SEED_ID}").json()
        assert reg["status"] == "assigned" and "issuedCertificateChain" not in reg
    assert issued_count(server, SEED_ID) == 1


# ---------------------------------------------------------------- symmetric key
def test_symmetric_key_group_with_cli_derived_key(server, tmp_path):
    with svc(server) as c:
        namespace(c, "sym-ns", "line")
        put(c, "/enrollmentGroups/sym-group", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "line",
                                               "initialTwin": {"tags": {"fleet": "a"}}})
        group_key = c.post("/enrollmentGroups/sym-group/attestationmechanism").json()["symmetricKey"]["primaryKey"]
    rid = "sym-dev-01"
    out = invoke_cli(server.env, "dps", "enrollment-group", "compute-device-key", "--enrollment-id", "sym-group",
                     "--registration-id", rid)
    assert out.returncode == 0, out.stderr
    derived = out.stdout.strip().strip('"')
    expected = base64.b64encode(hmac.new(base64.b64decode(group_key), rid.encode(), hashlib.sha256).digest()).decode()
    assert derived == expected
    with device(server) as d:
        _, result = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, derived)},
                             body={"registrationId": rid, "csr": csr_b64(tmp_path, rid), "payload": {"fw": "1.0"}})
    state = result["registrationState"]
    assert state["status"] == "assigned" and state["symmetricKey"] == {"enrollmentGroupId": "sym-group"}
    openssl_verify_chain(tmp_path, chain_from(state))
    with svc(server) as c:
        assert c.get(f"/linkedHubs/default/devices/{rid}").json()["tags"] == {"fleet": "a"}
        regs = c.post("/registrations/sym-group/query").json()
        assert [r["registrationId"] for r in regs] == [rid]


def test_individual_symmetric_key_without_csr_creates_sas_device(server):
    with svc(server) as c:
        doc = put(c, "/enrollments/sym-individual", {"attestation": {"type": "symmetricKey"}, "deviceId": "sym-ind-device"})
        key = doc["attestation"]["symmetricKey"]["secondaryKey"]
        assert "primaryKey" not in c.get("/enrollments/sym-individual").json()["attestation"].get("symmetricKey", {})
    with device(server) as d:  # secondary key, lower-case percent-encoding (as the C SDK sends)
        _, result = register(server, d, "sym-individual", api_version="2019-03-31",
                             headers={"Authorization": device_sas(server.id_scope, "sym-individual", key, lower_hex=True)})
    state = result["registrationState"]
    assert state["deviceId"] == "sym-ind-device" and "issuedCertificateChain" not in state
    with svc(server) as c:
        assert c.get("/linkedHubs/default/devices/sym-ind-device").json()["authenticationType"] == "sas"


def test_csr_needs_the_preview_api_version_and_a_policy(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/no-policy", {"attestation": {"type": "symmetricKey"}})
    auth = {"Authorization": device_sas(server.id_scope, "no-policy", key)}
    csr = csr_b64(tmp_path, "no-policy")
    with device(server) as d:
        r, _ = register(server, d, "no-policy", headers=auth, body={"csr": csr}, api_version="2021-06-01")
        assert_azure_error(r, 400, "api-version")
        r, _ = register(server, d, "no-policy", headers=auth, body={"csr": csr})
        assert_azure_error(r, 400, "no credentialPolicyName")
    assert_nothing_left(server, "no-policy")


# ---------------------------------------------------------------- X.509 individual and group on root
def test_individual_x509_self_signed(server, tmp_path):
    cert, key = make_leaf("x509-self", None)
    cert_file, key_file = write_identity(tmp_path, "self", [cert], key)
    with svc(server) as c:
        namespace(c, "self-ns", "self-p")
        put(c, "/enrollments/x509-self", {"credentialPolicyName": "self-p", "attestation": {"type": "x509", "x509": {
            "clientCertificates": {"primary": {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}}}}})
    with device(server, cert_file, key_file) as d:
        _, result = register(server, d, "x509-self", body={"registrationId": "x509-self", "csr": csr_b64(tmp_path, "x509-self")})
    state = result["registrationState"]
    assert state["status"] == "assigned"
    assert state["x509"]["certificateInfo"]["sha256Thumbprint"] == hashlib.sha256(
        cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    openssl_verify_chain(tmp_path, chain_from(state))
    other, other_key = make_leaf("x509-self", None)  # same CN, not the enrolled certificate
    f, k = write_identity(tmp_path, "other", [other], other_key)
    with device(server, f, k) as d:
        r, _ = register(server, d, "x509-self")
    assert_azure_error(r, 401, "not the one enrolled", code=401002)


def test_group_on_root_with_device_sending_leaf_and_intermediate(server, tmp_path):
    root = make_ca("root-only-root")
    ica = make_ca("root-only-ica", root)
    leaf, key = make_leaf("via-root-01", ica)
    cert_file, key_file = write_identity(tmp_path, "dev", [leaf, ica.cert], key)
    with svc(server) as c:
        upload_verified(server, c, "root-only", root)
        namespace(c, "root-ns", "root-p")
        put(c, "/enrollmentGroups/on-root", {"credentialPolicyName": "root-p", "attestation": {
            "type": "x509", "x509": {"caReferences": {"primary": "root-only"}}}})
    with device(server, cert_file, key_file) as d:
        _, result = register(server, d, "via-root-01", body={"csr": csr_b64(tmp_path, "via-root-01")})
    assert result["registrationState"]["x509"]["enrollmentGroupId"] == "on-root"
    openssl_verify_chain(tmp_path, chain_from(result["registrationState"]))


# ---------------------------------------------------------------- refusals leave nothing behind
def test_x509_refusals(server, tmp_path):
    root = make_ca("refusal-root")
    with svc(server) as c:
        upload_verified(server, c, "refusal-root", root)
        put(c, "/enrollmentGroups/refusal-group", {"attestation": {"type": "x509", "x509": {"caReferences": {
            "primary": "refusal-root"}}}})
        disabled_root = make_ca("disabled-root")
        upload_verified(server, c, "disabled-root", disabled_root)
        put(c, "/enrollmentGroups/disabled-group", {"provisioningStatus": "disabled", "attestation": {
            "type": "x509", "x509": {"caReferences": {"primary": "disabled-root"}}}})
    stranger = make_ca("stranger-root")
    cases = [
        ("expired-01", make_leaf("expired-01", root, not_before=timedelta(days=-10), not_after=timedelta(days=-1)),
         401, "expired"),
        ("future-01", make_leaf("future-01", root, not_before=timedelta(days=1), not_after=timedelta(days=9)),
         401, "not yet valid"),
        ("wrong-eku-01", make_leaf("wrong-eku-01", root, eku=ExtendedKeyUsageOID.SERVER_AUTH), 401, "client authentication"),
        ("unknown-ca-01", make_leaf("unknown-ca-01", stranger), 401, "does not chain"),
        ("disabled-01", make_leaf("disabled-01", disabled_root), 403, "disabled"),
        ("cn-mismatch-01", make_leaf("someone-else", root), 401, "does not match registration id"),
    ]
    impostor = Ca(make_ca("refusal-root").cert, ec.generate_private_key(ec.SECP256R1()))  # same name, another key
    cases.append(("forged-01", make_leaf("forged-01", impostor), 401, "does not validate"))
    for rid, (cert, key), status, words in cases:
        sent = [cert, root.cert] if rid == "forged-01" else [cert]  # the real CA certificate is public
        f, k = write_identity(tmp_path, rid, sent, key)
        with device(server, f, k) as d:
            r, _ = register(server, d, rid, body={"csr": csr_b64(tmp_path, rid)})
        assert_azure_error(r, status, words)
        assert_nothing_left(server, rid)
    with device(server) as d:  # no credential at all
        r, _ = register(server, d, "nobody-01")
    assert_azure_error(r, 401, "no credential")


def test_symmetric_key_refusals(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/sas-refusals", {"attestation": {"type": "symmetricKey"}})
        dkey = sym_key(c, "/enrollments/sas-disabled", {"provisioningStatus": "disabled", "attestation": {
            "type": "symmetricKey"}})
    wrong = base64.b64encode(b"x" * 32).decode()
    now = int(time.time())
    expired = sas.generate(f"{server.id_scope}/registrations/sas-refusals", key, ttl=-3600, now=now)
    tampered = device_sas(server.id_scope, "sas-refusals", key).replace("&se=", "&se=1")

    def with_se(text: str) -> str:
        return re.sub(r"&se=[0-9]+", f"&se={text}", device_sas(server.id_scope, "sas-refusals", key))
    cases = [
        (device_sas(server.id_scope, "sas-refusals", wrong), 401, "does not verify"),
        (expired, 401, "expired"),
        (tampered, 401, "does not verify"),
        (device_sas(server.id_scope, "someone-else", key), 401, "does not name"),
        (device_sas("0ne00000000", "sas-refusals", key), 401, "does not name"),
        ("SharedAccessSignature garbage", 401, "invalid"),
        # the audience of another service or shape, and se in forms no SDK sends: each a named 401, never a 500
        (sas.generate("localhost/devices/sas-refusals", key), 401, "does not name"),
        (sas.generate(f"{server.id_scope}/registrations/sas-refusals/", key), 401, "does not name"),
        (sas.generate(f"{server.id_scope}/registrations", key), 401, "does not name"),
        (with_se("soon"), 401, "not an integer"),
        (with_se("9" * 5000), 401, "not an integer"),
        (device_sas(server.id_scope, "sas-refusals", key) + f"&se={now + 3600}", 401, "given twice"),
        (re.sub(r"&sig=[^&]*", "&sig=%%%ZZ", device_sas(server.id_scope, "sas-refusals", key)), 401, "does not verify"),
        (sas.generate(f"{server.id_scope}/registrations/sas-refusals",
                      sas.parse_connection_string(server.connection_string)["SharedAccessKey"],
                      key_name="provisioningserviceowner"), 401, "does not verify"),  # a service policy's key
    ]
    with device(server) as d:
        for token, status, words in cases:
            r, _ = register(server, d, "sas-refusals", headers={"Authorization": token})
            assert_azure_error(r, status, words)
        r, _ = register(server, d, "sas-disabled", headers={"Authorization": device_sas(server.id_scope, "sas-disabled", dkey)})
        assert_azure_error(r, 403, "disabled")
        # the wrong ID scope in the path is refused whatever the token says
        r = d.put("/0ne00000000/registrations/sas-refusals/register", params={"api-version": PREVIEW},
                  json={}, headers={"Authorization": device_sas("0ne00000000", "sas-refusals", key)})
        assert_azure_error(r, 401, "unknown ID scope")
        # a bad CSR is refused before anything is written
        auth = {"Authorization": device_sas(server.id_scope, "sas-refusals", key)}
        r, _ = register(server, d, "sas-refusals", headers=auth, body={"csr": "not base64!"})
        assert_azure_error(r, 400)
    assert_nothing_left(server, "sas-refusals")
    assert_nothing_left(server, "sas-disabled")


def _raw_request(server, method: str, path: str, headers: dict, parts: list[bytes]) -> tuple[int, dict]:
    """One HTTPS request whose body is sent in ``parts``, a pause between them (as a slow link or TLS records split
    it); the status and the JSON answer."""
    import socket

    host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=server.ca_file)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, "Connection": "close", **headers}.items())
        tls.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode())
        for n, part in enumerate(parts):
            if n:
                time.sleep(0.3)
            tls.sendall(part)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_body_arriving_in_parts_is_read_whole(server):
    """The device API read what had arrived of a body, up to its bound: a valid 20 KB registration body sent in two
    parts (longer than one TLS record, or a slow link) was parsed cut short, a 400 "not valid JSON"."""
    with svc(server) as c:
        key = sym_key(c, "/enrollments/split-body", {"attestation": {"type": "symmetricKey"}})
    base = f"/{server.id_scope}/registrations/split-body"
    auth = {"Authorization": device_sas(server.id_scope, "split-body", key), "Content-Type": "application/json"}
    body = json.dumps({"registrationId": "split-body", "payload": {"blob": "x" * 20_000}}).encode()
    halves = [body[:1000], body[1000:]]
    status, answer = _raw_request(server, "PUT", f"{base}/register?api-version={PREVIEW}",
                                  {**auth, "Content-Length": str(len(body))}, halves)
    assert (status, answer.get("status")) == (202, "assigned"), answer
    status, answer = _raw_request(server, "POST", f"{base}?api-version={PREVIEW}",
                                  {**auth, "Content-Length": str(len(body))}, halves)
    assert (status, answer.get("status")) == (200, "assigned"), answer
    # the bound still holds for a body of no announced length (chunked), whatever its parts
    chunk = b"{" + b" " * 20_000
    chunked = [b"%x\r\n%s\r\n" % (len(chunk), chunk), b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)]
    status, answer = _raw_request(server, "PUT", f"{base}/register?api-version={PREVIEW}",
                                  {**auth, "Transfer-Encoding": "chunked"}, chunked)
    assert (status, answer["errorCode"]) == (413, 413001), answer
    # a registrationId that does not match is named cut short (the peer chose its length)
    with device(server) as d:
        r = d.put(f"{base}/register", params={"api-version": PREVIEW}, json={"registrationId": "y" * 30_000},
                  headers=auth)
    assert_azure_error(r, 400, "does not match")
    assert len(r.json()["message"]) < 400


def test_bad_csr_corpus_leaves_nothing(server, tmp_path):
    with svc(server) as c:
        namespace(c, "csr-ns", "csr-p")
        key = sym_key(c, "/enrollments/csr-victim", {"credentialPolicyName": "csr-p", "attestation": {"type": "symmetricKey"}})
    auth = {"Authorization": device_sas(server.id_scope, "csr-victim", key)}
    bad = {
        "P-256 not allowed by the policy": csr_b64(tmp_path / "p256", "csr-victim", "P-256"),
        "CN mismatch": csr_b64(tmp_path / "cn", "someone-else"),
        "garbage": base64.b64encode(b"\x30\x03garbage").decode(),
    }
    with device(server) as d:
        for why, csr in bad.items():
            r, _ = register(server, d, "csr-victim", headers=auth, body={"csr": csr})
            assert_azure_error(r, 400), why
    assert_nothing_left(server, "csr-victim")


# ---------------------------------------------------------------- registration semantics
def test_reregistration_with_new_csr_gives_new_certificate_and_one_device(server, tmp_path):
    with svc(server) as c:
        namespace(c, "renew-ns", "renew-p")
        key = sym_key(c, "/enrollments/renewing", {"credentialPolicyName": "renew-p", "attestation": {"type": "symmetricKey"},
                                                "initialTwin": {"tags": {"t": 1}}})
    auth = {"Authorization": device_sas(server.id_scope, "renewing", key)}
    serials = []
    with device(server) as d:
        for n in range(2):
            _, result = register(server, d, "renewing", headers=auth, body={"csr": csr_b64(tmp_path / str(n), "renewing")})
            serials.append(chain_from(result["registrationState"])[0].serial_number)
    assert serials[0] != serials[1]
    assert issued_count(server, "renewing") == 2
    with svc(server) as c:
        devices = [x["deviceId"] for x in c.get("/linkedHubs/default/devices").json()["value"]]
        assert devices.count("renewing") == 1
        rec = c.get("/namespaces/renew-ns/devices/renewing").json()
        assert rec["properties"]["operationalCertificate"]["serialNumber"] == f"{serials[1]:032X}"  # as Azure shows
        reg = c.get("/registrations/renewing").json()
        r = c.delete("/registrations/renewing", headers={"If-Match": '"stale"'})
        assert r.status_code == 412
        assert c.delete("/registrations/renewing", headers={"If-Match": f'"{reg["etag"]}"'}).status_code == 204
        assert c.get("/registrations/renewing").status_code == 404
    with device(server) as d:  # registers again as new
        _, result = register(server, d, "renewing", headers=auth)
    assert result["registrationState"]["substatus"] == "initialAssignment"


def test_hashed_allocation_and_reprovisioning(server):
    with svc(server) as c:
        for name in ("hash-a", "hash-b"):
            r = c.put(f"/linkedHubs/{name}", json={"properties": {"hostName": f"{name}.localhost",
                                                                  "applyAllocationPolicy": False}})
            assert r.status_code == 201, r.text
        key = sym_key(c, "/enrollmentGroups/hashing", {"attestation": {"type": "symmetricKey"},
                                                   "iotHubs": ["hash-a.localhost", "hash-b.localhost"],
                                                   "initialTwin": {"tags": {"v": 1}}})
    assigned = {}
    with device(server) as d:
        for i in range(24):
            rid = f"hashed-{i:02d}"
            dk = base64.b64encode(hmac.new(base64.b64decode(key), rid.encode(), hashlib.sha256).digest()).decode()
            _, result = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, dk)})
            assigned[rid] = result["registrationState"]["assignedHub"]
    counts = {h: list(assigned.values()).count(h) for h in ("hash-a.localhost", "hash-b.localhost")}
    assert min(counts.values()) >= 6, counts  # both hubs used, roughly evenly
    # re-registering is deterministic: same hub, data kept
    rid = "hashed-00"
    dk = base64.b64encode(hmac.new(base64.b64decode(key), rid.encode(), hashlib.sha256).digest()).decode()
    with device(server) as d:
        _, again = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, dk)})
    assert again["registrationState"]["assignedHub"] == assigned[rid]
    # move the group to one hub with migrateDeviceData=false: device moves, twin reset to the initial twin
    target = "hash-b.localhost" if assigned[rid] == "hash-a.localhost" else "hash-a.localhost"
    with svc(server) as c:
        cur = c.get("/enrollmentGroups/hashing").json()
        cur.update({"iotHubs": [target], "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False},
                    "initialTwin": {"tags": {"v": 2}}})
        r = c.put("/enrollmentGroups/hashing", json=cur, headers={"If-Match": f'"{cur["etag"]}"'})
        assert r.status_code == 200, r.text
        stale = c.put("/enrollmentGroups/hashing", json=cur, headers={"If-Match": f'"{cur["etag"]}"'})
        assert_azure_error(stale, 412)
    with device(server) as d:
        _, moved = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, dk)})
    state = moved["registrationState"]
    assert state["assignedHub"] == target and state["substatus"] == "deviceDataReset"
    old_hub, new_hub = ("hash-a", "hash-b") if target == "hash-b.localhost" else ("hash-b", "hash-a")
    with svc(server) as c:
        assert c.get(f"/linkedHubs/{old_hub}/devices/{rid}").status_code == 404
        assert c.get(f"/linkedHubs/{new_hub}/devices/{rid}").json()["tags"] == {"v": 2}
        assert_azure_error(c.delete(f"/linkedHubs/{new_hub}"), 409, "used by enrollment")


class _Webhook(BaseHTTPRequestHandler):
    answers: list = []
    requests: list = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        status, answer = type(self).answers.pop(0)
        if status == "hang":
            time.sleep(3)
            status = 200
        elif status == "slow":  # answers, but later than a register is answered at once (1 s)
            time.sleep(1.3)
            status = 200
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the server gave up waiting (the timeout case)
            pass

    def log_message(self, *args) -> None:
        pass


def test_custom_allocation_webhook(server):
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/allocate?code=secret"
    try:
        with svc(server) as c:
            custom = {"webhookUrl": url, "apiVersion": "2021-10-01", "timeoutInSeconds": 2}
            key = sym_key(c, "/enrollments/custom-dev", {"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                                                         "customAllocationDefinition": custom})
        auth = {"Authorization": device_sas(server.id_scope, "custom-dev", key)}
        _Webhook.answers[:] = [(500, {}), (200, {"iotHubHostName": "elsewhere.example"}), (200, {"no": "hub"}), ("hang", {}),
                               (200, {"iotHubHostName": "localhost", "payload": {"site": "b7"},
                                      "initialTwin": {"tags": {"from": "webhook"}}}),
                               ("slow", {"iotHubHostName": "localhost", "payload": {"site": "b8"}})]
        _Webhook.requests.clear()
        with device(server) as d:
            for words in ("HTTP 500", "not one of the enrollment's linked hubs", "lacks iotHubHostName",
                          "did not answer within 2 s"):
                r, result = register(server, d, "custom-dev", headers=auth, body={"payload": {"model": "x1"}})
                assert r.status_code == 202
                assert result["status"] == "failed" and words in result["registrationState"]["errorMessage"]
                assert result["registrationState"]["errorCode"] // 1000 == 400
                assert_nothing_left(server, "custom-dev")
            r, result = register(server, d, "custom-dev", headers=auth, body={"payload": {"model": "x1"}})
            # assigned at once: 202 (all C# accepts) whose body is the final state, without Retry-After
            assert r.status_code == 202 and "Retry-After" not in r.headers
            assert result["status"] == "assigned" and result["registrationState"]["payload"] == {"site": "b7"}
            # a registration that takes longer than the register answer waits for keeps the 202 + poll path
            r, slow = register(server, d, "custom-dev", headers=auth, body={"payload": {"model": "x1"}})
            assert r.status_code == 202 and r.json()["status"] == "assigning" and r.headers["Retry-After"] == "2"
            assert slow["status"] == "assigned" and slow["registrationState"]["payload"] == {"site": "b8"}
        sent = _Webhook.requests[-2]
        assert sent["deviceRuntimeContext"]["registrationId"] == "custom-dev"
        assert sent["deviceRuntimeContext"]["payload"] == {"model": "x1"}
        assert sent["individualEnrollment"]["registrationId"] == "custom-dev"
        assert "localhost" in sent["linkedHubs"]
        with svc(server) as c:
            assert c.get("/linkedHubs/default/devices/custom-dev").json()["tags"] == {"from": "webhook"}
    finally:
        hook.shutdown()


# ---------------------------------------------------------------- protocol details
def test_polling_unknown_operation_throttling_status_lookup_and_limits(server):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/poller", {"attestation": {"type": "symmetricKey"}})
    auth = {"Authorization": device_sas(server.id_scope, "poller", key)}
    base = f"/{server.id_scope}/registrations/poller"
    with device(server) as d:
        r = d.get(f"{base}/operations/5.0000.nope", params={"api-version": PREVIEW}, headers=auth)
        assert_azure_error(r, 404, "does not exist")
        r = d.post(base, params={"api-version": PREVIEW}, json={"registrationId": "poller"}, headers=auth)
        assert_azure_error(r, 404, "registration")
        _, result = register(server, d, "poller", headers=auth)  # the poll inside counts too
        statuses = [d.post(base, params={"api-version": PREVIEW}, json={}, headers=auth).status_code for _ in range(5)]
        assert statuses[:2] == [200, 200] and statuses[-1] == 429
        r = d.post(base, params={"api-version": PREVIEW}, json={}, headers=auth)
        assert_azure_error(r, 429, "too many requests")
        assert 1 <= int(r.headers["Retry-After"]) <= 10
        r = d.put(f"/{server.id_scope}/registrations/bad%20id!/register", params={"api-version": PREVIEW}, json={})
        assert_azure_error(r, 400, "invalid")
        r = d.put(f"{base}/register", params={"api-version": PREVIEW}, content=b"{" + b" " * 40_000 + b"}",
                  headers={**auth, "Content-Type": "application/json"})
        assert_azure_error(r, 413)
        r = d.put(f"{base}/register", params={"api-version": PREVIEW}, json={"registrationId": "other"}, headers=auth)
        assert_azure_error(r, 400, "does not match")
    assert result["registrationState"]["status"] == "assigned"


def test_operation_survives_restart(tmp_path):
    with database("sqlite", tmp_path) as db_url:
        gen = _run_server(db_url, tmp_path)
        first = next(gen)
        with svc(first) as c:
            key = sym_key(c, "/enrollments/restarting", {"attestation": {"type": "symmetricKey"}})
        auth = {"Authorization": device_sas(first.id_scope, "restarting", key)}
        with device(first) as d:
            r = d.put(f"/{first.id_scope}/registrations/restarting/register", params={"api-version": PREVIEW},
                      json={}, headers=auth)
        assert r.status_code == 202 and r.json()["status"] == "assigned"
        op = r.json()["operationId"]
        next(gen, None)  # runs the fixture's teardown: the server stops
        gen2 = _run_server(db_url, tmp_path)
        second = next(gen2)
        assert second.url != first.url or second.proc.pid != first.proc.pid
        with device(second) as d:
            g = d.get(f"/{second.id_scope}/registrations/restarting/operations/{quote(op)}",
                      params={"api-version": PREVIEW}, headers=auth)
        next(gen2, None)
    assert g.status_code == 200 and g.json()["status"] == "assigned"
    assert g.json()["registrationState"]["deviceId"] == "restarting"


def test_individual_wins_and_the_nearest_group_decides(server, tmp_path):
    root = make_ca("order-root")
    ica = make_ca("order-ica", root)
    with svc(server) as c:
        upload_verified(server, c, "order-root", root)
        upload_verified(server, c, "order-ica", ica)
        put(c, "/enrollmentGroups/order-near", {"provisioningStatus": "disabled", "attestation": {
            "type": "x509", "x509": {"caReferences": {"primary": "order-ica"}}}})
        put(c, "/enrollmentGroups/order-far", {"attestation": {"type": "x509", "x509": {"caReferences": {
            "primary": "order-root"}}}})
        pinned, pinned_key = make_leaf("order-pinned", ica)
        put(c, "/enrollments/order-pinned", {"attestation": {"type": "x509", "x509": {"clientCertificates": {
            "primary": {"certificate": base64.b64encode(pinned.public_bytes(serialization.Encoding.DER)).decode()}}}}})
    # the disabled group on the nearest CA decides, although the root's group is enabled
    leaf, key = make_leaf("order-grouped", ica)
    f, k = write_identity(tmp_path, "grouped", [leaf, ica.cert], key)
    with device(server, f, k) as d:
        r, _ = register(server, d, "order-grouped")
    assert_azure_error(r, 403, "order-near")
    assert_nothing_left(server, "order-grouped")
    # an individual enrollment wins over any group
    f, k = write_identity(tmp_path, "pinned", [pinned, ica.cert], pinned_key)
    with device(server, f, k) as d:
        _, result = register(server, d, "order-pinned")
    assert result["status"] == "assigned" and "enrollmentGroupId" not in result["registrationState"]["x509"]
    with svc(server) as c:
        near = c.get("/enrollmentGroups/order-near").json()
        near["provisioningStatus"] = "enabled"
        assert c.put("/enrollmentGroups/order-near", json=near).status_code == 200
    with device(server, *write_identity(tmp_path, "grouped", [leaf, ica.cert], key)) as d:
        _, result = register(server, d, "order-grouped")
    assert result["registrationState"]["x509"]["enrollmentGroupId"] == "order-near"


def test_hub_trust_follows_policy_links_and_rotation(server, tmp_path):
    with svc(server) as c:
        namespace(c, "sync-ns", "sync-p")
        assert c.put("/linkedHubs/sync-hub", json={"properties": {"hostName": "sync-hub.localhost",
                                                                   "applyAllocationPolicy": False}}).status_code == 201

        def trusted() -> list[x509.Certificate]:
            return [x509.load_pem_x509_certificate(t["properties"]["certificate"].encode())
                    for t in c.get("/linkedHubs/sync-hub/certificates").json()["value"]]

        first = x509.load_pem_x509_certificate(c.get("/namespaces/sync-ns/credentials/default/policies/sync-p").json()[
            "properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"].encode())
        assert first not in trusted()
        key = sym_key(c, "/enrollments/sync-dev", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "sync-p",
                                                   "iotHubs": ["sync-hub"]})
        assert trusted() == [first]
        r = c.post("/namespaces/sync-ns/credentials/default/policies/sync-p/rotate")
        assert r.status_code == 200, r.text
        second = x509.load_pem_x509_certificate(
            r.json()["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"].encode())
        assert second != first and set(trusted()) == {first, second}
        assert first not in [x509.load_pem_x509_certificate(t["properties"]["certificate"].encode())
                             for t in c.get("/linkedHubs/default/certificates").json()["value"]]
    with device(server) as d:
        _, result = register(server, d, "sync-dev", headers={"Authorization": device_sas(server.id_scope, "sync-dev", key)},
                             body={"csr": csr_b64(tmp_path, "sync-dev")})
    chain = chain_from(result["registrationState"])
    assert result["registrationState"]["assignedHub"] == "sync-hub.localhost" and chain[1] == second
    openssl_verify_chain(tmp_path, chain)


def test_enrollment_errors_and_paging_over_the_api(server):
    """Validation itself is tested in-process (tests/unit/provisioning/test_enrollments.py); here: the wire."""
    with svc(server) as c:
        assert_azure_error(c.put("/enrollments/invalid-one", json={"attestation": {"type": "none"}}), 400,
                           "attestation.type must be one of")
        assert c.get("/enrollments/invalid-one").status_code == 404
        unverified = make_ca("never-verified")
        assert c.put("/certificates/never-verified", json={"certificate": unverified.pem}).status_code == 201
        assert_azure_error(c.put("/enrollmentGroups/on-unverified", json={"attestation": {"type": "x509", "x509": {
            "caReferences": {"primary": "never-verified"}}}}), 400, "not verified", code=400012)
        put(c, "/enrollments/paged-1", {"attestation": {"type": "symmetricKey"}})
        put(c, "/enrollments/paged-2", {"attestation": {"type": "symmetricKey"}})
        listed = c.post("/enrollments/query", json={"query": "*"}, headers={"x-ms-max-item-count": "1"})
        assert listed.status_code == 200 and len(listed.json()) == 1 and listed.headers["x-ms-continuation"] == "1"
    with device(server) as d:
        rid = "r" * 129
        r, _ = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, base64.b64encode(
            b"k" * 32).decode())})
    assert_azure_error(r, 400, "invalid")


def test_concurrent_registrations_of_one_device_leave_one_identity(server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with svc(server) as c:
        namespace(c, "race-ns", "race-p")
        key = sym_key(c, "/enrollments/racer", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "race-p"})
    auth = {"Authorization": device_sas(server.id_scope, "racer", key)}
    csrs = [csr_b64(tmp_path / str(i), "racer") for i in range(6)]

    def one(csr: str) -> int:
        with device(server) as d:
            r = d.put(f"/{server.id_scope}/registrations/racer/register", params={"api-version": PREVIEW},
                      json={"csr": csr}, headers=auth)
            return r.status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, csrs))
    # 202: assigned (at once or after the answer); 409: lost the race
    assert set(statuses) <= {202, 409} and 202 in statuses, statuses
    with svc(server) as c:
        devices = [x["deviceId"] for x in c.get("/linkedHubs/default/devices").json()["value"]]
        assert devices.count("racer") == 1
        assert [d["name"] for d in c.get("/namespaces/race-ns/devices").json()["value"]] == ["racer"]
        assert c.get("/registrations/racer").json()["status"] == "assigned"
    assert issued_count(server, "racer") == statuses.count(202)


def test_hub_and_namespace_device_lists_are_pages(server):
    """GET /linkedHubs/{name}/devices and /namespaces/{ns}/devices answer a page in device id order (top 1-1000,
    default 1000) and a continuationToken while more follow; the pages add up to the whole list."""
    with svc(server) as c:
        for d in ("pg-b", "PG-a", "pg-c"):
            assert c.put(f"/devices/{d}", params={"hub": "default"}, json={"deviceId": d}).status_code == 200
        everything = c.get("/linkedHubs/default/devices").json()
        assert "continuationToken" not in everything
        ids = [d["deviceId"] for d in everything["value"]]
        assert {"PG-a", "pg-b", "pg-c"} <= set(ids) and ids == sorted(ids, key=str.lower)
        pages, token = [], None
        while True:
            more = {"continuationToken": token} if token else {}
            body = c.get("/linkedHubs/default/devices", params={"top": 2, **more}).json()
            pages.append([d["deviceId"] for d in body["value"]])
            token = body.get("continuationToken")
            if token is None:
                break
        assert [d for p in pages for d in p] == ids and all(len(p) == 2 for p in pages[:-1]) and pages[-1]
        namespace(c, "pg-ns", "pg-p")
        for path in ("/linkedHubs/default/devices", "/namespaces/pg-ns/devices"):
            for bad in ("0", "1001", "ten", "\u00b2", "9" * 5000):  # a superscript two, and past int()'s digit limit
                r = c.get(path, params={"top": bad})
                assert r.status_code == 400 and "top must be an integer from 1 to 1000" in r.text, r.text
            r = c.get(path, params={"continuationToken": "%%%"})
            assert r.status_code == 400 and "continuationToken is not one this service gave" in r.text, r.text
        assert c.get("/namespaces/pg-ns/devices", params={"top": 1}).json() == {"value": []}  # no token either


def test_old_operation_results_are_swept(tmp_path):
    from opendps.instance import Settings, open_instance
    from opendps.provisioning.registration import OPERATION_TTL
    from opendps.store import Operation

    inst = open_instance(Settings.load(tmp_path / "data", lint=False))
    try:
        now = datetime.now(UTC)
        with inst.store.session() as s:
            for op_id, age in (("old", OPERATION_TTL + timedelta(minutes=1)), ("fresh", OPERATION_TTL - timedelta(minutes=1))):
                s.add(Operation(operation_id=op_id, registration_key="r", status="assigned", result={}, created_at=now - age))
        assert inst.services.provisioning.sweep_operations(now) == 1
        with inst.store.session() as s:
            assert [o.operation_id for o in s.scalars(select(Operation))] == ["fresh"]
    finally:
        inst.close()
