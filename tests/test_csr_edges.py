"""What a device sends DPS for its operational certificate, at its edges: hostile CSRs and registration bodies.

The rule: every issued certificate is P-384 (P-256 where the policy allows it) signed with SHA-384, chained to the
namespace root, with the leaf profile's extensions only, CN = the registration id, nothing from the CSR but the public
key, and pkilint finds nothing; anything else is refused with a 4xx naming the problem (an Azure error body; over
MQTT on ``$dps/registrations/res/{status}/``), never a 500 or silence, and leaves nothing behind: no
issued_certificates row, audit entry, registration or hub device.

In-process: :func:`opendps.pki.csr.validate_csr` on hand-made DER (cryptography parses a CSR's subject and
extensions lazily, so some malformed values only raised once asked for: a traceback, not a refusal), the one body
parser, and the DPS MQTT session's answer to a bug. Over real sockets: one ``opendps serve`` with a symmetric-key
group and an X.509 group, CSRs from cryptography, ``openssl req`` and by hand, over HTTPS and MQTT.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from sqlalchemy import func, select
from tests.test_device_api import PREVIEW, device, device_sas, make_ca, make_leaf, namespace, put, svc, upload_verified
from tests.test_device_api import write_identity as _write_identity
from tests.test_mqtt_hub import Client, dps_username

from opendps.errors import InvalidInput
from opendps.frontends.device_request import parse_registration_body
from opendps.pki.csr import CsrRejected, validate_csr
from opendps.pki.lint import lint_certificate
from opendps.store import IssuedCertificate, Registration, Store
from opendps.store.models import AuditEntry, HubDevice
from opendps.transport.sas import derive_device_key

pytestmark = pytest.mark.timeout(300, func_only=True)
SERVER_STORES = ("sqlite",)  # the front ends are the subject; the domain behind them runs on both stores in-process


# ---------------------------------------------------------------- hand-made DER
def _tlv(tag: int, content: bytes) -> bytes:
    n, size = len(content), (len(content).bit_length() + 7) // 8
    return bytes([tag]) + (bytes([n]) if n < 0x80 else bytes([0x80 | size]) + n.to_bytes(size, "big")) + content


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _set(*items: bytes) -> bytes:
    return _tlv(0x31, b"".join(items))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    out = bytearray([first * 40 + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _utf8(text: str) -> bytes:
    return _tlv(0x0C, text.encode())


CN_OID = "2.5.4.3"
BASIC_CONSTRAINTS_OID = "2.5.29.19"
SAN_OID = "2.5.29.17"


def _name(*attributes: tuple[str, bytes]) -> bytes:
    return _seq(*(_set(_seq(_oid(oid), value)) for oid, value in attributes))


def _extension(oid: str, value: bytes, critical: bool = False) -> bytes:
    return _seq(_oid(oid), *([_tlv(0x01, b"\xff")] if critical else []), _tlv(0x04, value))


def _extension_request(*extensions: bytes) -> bytes:
    return _seq(_oid("1.2.840.113549.1.9.14"), _set(_seq(*extensions)))


def hand_made_csr(key: ec.EllipticCurvePrivateKey, subject: bytes, *attributes: bytes) -> bytes:
    """A PKCS#10 request signed by ``key`` (so its signature verifies) whatever its subject and attributes hold."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = _seq(_tlv(0x02, b"\x00"), subject, spki, _tlv(0xA0, b"".join(attributes)))
    return _seq(info, _seq(_oid("1.2.840.10045.4.3.3")), _tlv(0x03, b"\x00" + key.sign(info, ec.ECDSA(hashes.SHA384()))))


def p384_csr(cn: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP384R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER))


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


_BASIC_CONSTRAINTS_EE = _extension(BASIC_CONSTRAINTS_OID, _seq(), critical=True)

# name -> (CSR for registration id `rid` made with `key`, words the refusal names); each was a traceback before
MALFORMED = {
    "an extension requested twice": (
        lambda rid, key: hand_made_csr(key, _name((CN_OID, _utf8(rid))),
                                       _extension_request(_BASIC_CONSTRAINTS_EE, _BASIC_CONSTRAINTS_EE)),
        "2.5.29.19 more than once"),
    "a SAN with an x400Address": (
        lambda rid, key: hand_made_csr(key, _name((CN_OID, _utf8(rid))),
                                       _extension_request(_extension(SAN_OID, _seq(_tlv(0xA3, b"\x05\x00"))))),
        "unsupported type"),
    "a CN that is an INTEGER": (
        lambda rid, key: hand_made_csr(key, _name((CN_OID, _tlv(0x02, b"\x05")))), "subject cannot be parsed"),
    "a CN that is not UTF-8": (
        lambda rid, key: hand_made_csr(key, _name((CN_OID, _tlv(0x0C, b"\xff\xfe")))), "subject cannot be parsed"),
}
# accepted before, though they do not say what the device is: the CN only folds onto the id, or text after the CSR
NOT_THE_ID_OR_NOT_ALONE = {
    "a CN with KELVIN SIGN for k": (
        lambda rid, key: p384_csr(rid.replace("k", "\u212a"), key), "does not match the registration id"),
    "PEM followed by other text": (lambda rid, key: _pem(p384_csr(rid, key)) + b"garbage", "nothing after it"),
    "PEM of two requests": (
        lambda rid, key: _pem(p384_csr(rid, key)) + _pem(p384_csr("someone-else")), "exactly one CERTIFICATE REQUEST"),
}


# ---------------------------------------------------------------- in-process: the CSR check
@pytest.mark.parametrize("case", [*MALFORMED, *NOT_THE_ID_OR_NOT_ALONE])
def test_a_malformed_or_misleading_csr_is_a_csr_refusal_naming_it(case):
    make, words = {**MALFORMED, **NOT_THE_ID_OR_NOT_ALONE}[case]
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CsrRejected, match=words) as refused:
        validate_csr(make("dev-k1", key), "dev-k1")
    assert refused.value.status == 400 and refused.value.error_code == 400037


def test_what_stays_accepted():
    """Controls: case differences, PEM with its line ends and trailing white space, DER, and a CSR whose extension
    requests are well formed (the leaf does not take them: tests/test_pki.py)."""
    key = ec.generate_private_key(ec.SECP384R1())
    der = p384_csr("DEV-K1", key)
    for data in (der, _pem(der), _pem(der).replace(b"\n", b"\r\n") + b"\r\n  \n"):
        assert validate_csr(data, "dev-k1").public_key == key.public_key()
    san = x509.SubjectAlternativeName([x509.DNSName("evil.example")])
    with_san = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                                   "dev-k1")]))
                .add_extension(san, critical=False).sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER))
    assert validate_csr(with_san, "dev-k1").curve == "secp384r1"


@pytest.mark.parametrize(("given", "rid"), [(True, "true"), (1, "1"), (1.5, "1.5"), (["dev-1"], "dev-1"),
                                           ({"id": "dev-1"}, "dev-1")])
def test_a_registration_id_in_the_body_must_be_a_string(given, rid):
    """``str(true)`` is ``"True"``: a boolean registrationId matched a device named "true" (and 1 one named "1")."""
    with pytest.raises(InvalidInput, match="must be a JSON string"):
        parse_registration_body(json.dumps({"registrationId": given}).encode(), rid)
    assert parse_registration_body(json.dumps({"registrationId": rid.upper()}).encode(), rid).csr is None


def test_a_dps_request_that_fails_unexpectedly_is_answered_500_over_mqtt(services, monkeypatch, caplog):
    """A bug behind the DPS MQTT session closed the connection without an answer or PUBACK, so the device sent the
    same request again; it is answered as over HTTPS: res/500 with a tracking id, the traceback in the log."""
    from opendps.frontends.mqtt.dps import DpsSession
    from opendps.frontends.runtime import Runtime
    from opendps.provisioning.attestation import MQTT, DeviceCredentials

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(services.provisioning, "register", broken)
    sent: list[tuple[str, bytes]] = []

    class Session:
        subscriptions = {"$dps/registrations/res/#": 1}

        async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
            sent.append((topic, payload))

    runtime = Runtime(services)
    try:
        dps = DpsSession(runtime, DeviceCredentials("0ne00000001", "dev-bug", None, (), {}, MQTT), PREVIEW, Session())
        with caplog.at_level("ERROR"):
            asyncio.run(dps.on_publish(dps.session, "$dps/registrations/PUT/iotdps-register/?$rid=7", b"{}", 1, False))
    finally:
        runtime.domain.close()
    [(topic, payload)] = sent
    assert topic == "$dps/registrations/res/500/?$rid=7"
    body = json.loads(payload)
    assert body["errorCode"] == 500000 and body["trackingId"] in body["message"]
    assert any(body["trackingId"] in r.getMessage() and r.exc_info for r in caplog.records)



def test_a_hub_certificate_request_that_fails_unexpectedly_gets_a_final_500(services, monkeypatch, caplog):
    """The hub's renewal (``$iothub/credentials``) answers 202 first; a bug after it left the device waiting for an
    answer that never came (no final status, the request held until the operation expired); it is answered res/500
    with a tracking id, the traceback in the log, as the DPS session answers."""
    from tests.x509_helpers import p384_csr

    from opendps.frontends.mqtt.hub import CREDENTIALS_RESPONSE, HubSession
    from opendps.frontends.runtime import Runtime
    from opendps.hub import AuthenticatedDevice

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(services.provisioning, "renew_through_hub", broken)
    sent: list[tuple[str, bytes]] = []

    class Session:
        subscriptions = {f"{CREDENTIALS_RESPONSE}/#": 1}

        async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
            sent.append((topic, payload))

    runtime = Runtime(services)
    device = AuthenticatedDevice(1, "default", "default.hubs.test", "dev-renew-bug", "dev-renew-bug", "x509")
    hub = HubSession(runtime, device, session=Session())  # type: ignore[arg-type]
    body = json.dumps({"id": "dev-renew-bug", "csr": base64.b64encode(p384_csr("dev-renew-bug")).decode()}).encode()
    try:
        with caplog.at_level("ERROR"):
            asyncio.run(hub.on_publish(hub.session, "$iothub/credentials/POST/issueCertificate/?$rid=req-1", body, 1,
                                       False))
    finally:
        runtime.domain.close()
    assert [topic for topic, _ in sent] == [f"{CREDENTIALS_RESPONSE}/202/?$rid=req-1",
                                            f"{CREDENTIALS_RESPONSE}/500/?$rid=req-1"]
    answer = json.loads(sent[1][1])
    assert answer["errorCode"] == 500000 and answer["trackingId"] in answer["message"]
    assert any(answer["trackingId"] in r.getMessage() and r.exc_info for r in caplog.records)
    assert not hub.renewing


# ---------------------------------------------------------------- over real sockets
NS, POLICY, SYM_GROUP, X509_GROUP, ROOT = "csr-edges", "csr-edges-p", "csr-edges-sym", "csr-edges-x509", "csr-edges-root"


@pytest.fixture(scope="module")
def fleet(server, tmp_path_factory):
    """A namespace with its policy, a symmetric-key group and an X.509 group (on a verified root) naming it."""
    with svc(server) as c:
        namespace(c, NS, POLICY)
        put(c, f"/enrollmentGroups/{SYM_GROUP}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
        group_key = c.post(f"/enrollmentGroups/{SYM_GROUP}/attestationmechanism").json()["symmetricKey"]["primaryKey"]
        ca = make_ca(ROOT)
        upload_verified(server, c, ROOT, ca)
        put(c, f"/enrollmentGroups/{X509_GROUP}", {"credentialPolicyName": POLICY, "attestation": {
            "type": "x509", "x509": {"caReferences": {"primary": ROOT}}}})
        root = x509.load_pem_x509_certificate(
            c.get(f"/namespaces/{NS}/credentials/default").json()["properties"]["certificate"].encode())
    return {"group_key": group_key, "ca": ca, "root": root, "dir": tmp_path_factory.mktemp("csr-edges")}


def _counts(server, rid: str) -> dict[str, int]:
    """What a registration of ``rid`` wrote: certificates, registration state, audit entries, hub devices."""
    store = Store(server.db_url)
    try:
        with store.session() as s:
            def count(model, column) -> int:
                return s.scalar(select(func.count()).select_from(model).where(column == rid)) or 0
            return {"issued_certificates": count(IssuedCertificate, IssuedCertificate.registration_id),
                    "registrations": count(Registration, Registration.registration_key),
                    "audit_log": count(AuditEntry, AuditEntry.device_id),
                    "hub_devices": count(HubDevice, HubDevice.device_key)}
    finally:
        store.dispose()


def assert_follows_the_rule(state: dict, rid: str, public_key, root: x509.Certificate) -> None:
    """The issued chain: [leaf, issuing CA, the namespace root]; the leaf of the profile, for this key and id only."""
    leaf, ica, top = (x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"])
    assert top == root
    leaf.verify_directly_issued_by(ica)
    ica.verify_directly_issued_by(root)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key().curve.name == "secp384r1"
    assert leaf.public_key() == public_key
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)])
    ext = {e.oid: e for e in leaf.extensions}
    assert set(ext) == {x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
                        x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid, x509.CRLDistributionPoints.oid,
                        x509.AuthorityInformationAccess.oid}
    assert ext[x509.BasicConstraints.oid].critical and ext[x509.BasicConstraints.oid].value == x509.BasicConstraints(
        ca=False, path_length=None)
    assert ext[x509.KeyUsage.oid].critical and ext[x509.KeyUsage.oid].value == x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    assert list(ext[x509.ExtendedKeyUsage.oid].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext[x509.SubjectKeyIdentifier.oid].value == x509.SubjectKeyIdentifier.from_public_key(public_key)
    assert ext[x509.AuthorityKeyIdentifier.oid].value.key_identifier == ica.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    crl = ext[x509.CRLDistributionPoints.oid].value
    assert [p.full_name[0].value.startswith("http://127.0.0.1") for p in crl] == [True]
    [aia] = ext[x509.AuthorityInformationAccess.oid].value
    assert aia.access_method == AuthorityInformationAccessOID.OCSP and aia.access_location.value.startswith(
        "http://127.0.0.1")
    assert not any(e.critical for oid, e in ext.items() if oid not in (x509.BasicConstraints.oid, x509.KeyUsage.oid))
    assert lint_certificate(leaf.public_bytes(serialization.Encoding.DER)) == []


def _openssl_csr(directory: Path, rid: str, *args: str) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    key_file = directory / f"{rid}.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
                    "-out", str(key_file)], check=True, capture_output=True)
    der = subprocess.run(["openssl", "req", "-new", "-key", str(key_file), "-subj", f"/CN={rid}", "-outform", "DER",
                          *args], check=True, capture_output=True).stdout
    return der, serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()


def _hand_made(make):
    def build(rid: str, directory: Path) -> tuple[bytes, ec.EllipticCurvePublicKey]:
        key = ec.generate_private_key(ec.SECP384R1())
        return make(rid, key), key.public_key()
    return build


def _rsa(rid: str, directory: Path) -> tuple[bytes, object]:
    key = rsa.generate_private_key(65537, 2048)
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                               rid)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER), key.public_key())


# name -> (CSR maker, None when a certificate is issued, else the words of the 400 refusal)
WIRE_CASES = {
    "openssl: CA:TRUE requested": (lambda rid, d: _openssl_csr(d, rid, "-addext", "basicConstraints=critical,CA:TRUE"),
                                   "CA:TRUE"),
    "openssl: keyCertSign, SAN, nameConstraints, AIA, CRL, serverAuth, an unknown critical extension": (
        lambda rid, d: _openssl_csr(d, rid, "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                                    "-addext", "subjectAltName=DNS:evil.example,IP:10.0.0.1",
                                    "-addext", "nameConstraints=critical,permitted;DNS:.example",
                                    "-addext", "authorityInfoAccess=OCSP;URI:http://evil.example/ocsp",
                                    "-addext", "crlDistributionPoints=URI:http://evil.example/crl",
                                    "-addext", "extendedKeyUsage=serverAuth,codeSigning",
                                    "-addext", "1.2.3.4.5=critical,ASN1:NULL"), None),
    "RSA-2048": (_rsa, "RSA-2048"),
    **{name: (_hand_made(make), words) for name, (make, words) in {**MALFORMED, **NOT_THE_ID_OR_NOT_ALONE}.items()},
}


def _case_rid(prefix: str, index: int) -> str:
    return f"{prefix}-k{index}"  # a 'k' for the KELVIN SIGN case; one id per case (the per-id registration limit)


@pytest.mark.parametrize("transport", ["https", "mqtt"])
@pytest.mark.parametrize("attestation", ["symmetricKey", "x509"])
def test_hostile_csrs_are_issued_by_the_rule_or_refused_leaving_nothing(server, fleet, transport, attestation):
    for index, (case, (make, refusal)) in enumerate(WIRE_CASES.items()):
        rid = _case_rid(f"edge-{transport}-{attestation[:3].lower()}", index)
        csr, public_key = make(rid, fleet["dir"])
        text = csr.decode() if csr.startswith(b"-----BEGIN") else base64.b64encode(csr).decode()
        status, body = _register(server, fleet, rid, {"registrationId": rid, "csr": text}, transport, attestation)
        if refusal is None:
            assert status in (200, 202) and body["status"] == "assigned", (case, status, body)
            assert_follows_the_rule(body["registrationState"], rid, public_key, fleet["root"])
            assert _counts(server, rid) == {"issued_certificates": 1, "registrations": 1, "audit_log": 2,
                                            "hub_devices": 1}, case
        else:
            assert status == 400, (case, status, body)
            assert body["errorCode"] == 400037 and refusal in body["message"], (case, body)
            assert {"errorCode", "trackingId", "message", "timestampUtc"} <= set(body)
            assert _counts(server, rid) == dict.fromkeys(("issued_certificates", "registrations", "audit_log",
                                                          "hub_devices"), 0), case


def _register(server, fleet, rid: str, body: dict, transport: str, attestation: str) -> tuple[int, dict]:
    """One register request; (status, answer body): HTTPS' status, or the status of MQTT's res/{status} topic."""
    auth: dict = {}
    if attestation == "symmetricKey":
        auth["password"] = device_sas(server.id_scope, rid, derive_device_key(fleet["group_key"], rid))
    else:
        cert, key = make_leaf(rid, fleet["ca"])
        auth["cert"], auth["key"] = _write_identity(fleet["dir"] / "bootstrap", rid, [cert], key)
    if transport == "https":
        headers = {"Authorization": auth["password"]} if "password" in auth else {}
        with device(server, auth.get("cert"), auth.get("key")) as d:
            r = d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                      json=body, headers=headers)
        return r.status_code, r.json()
    client = Client(server, rid, dps_username(server, rid), **auth)
    try:
        assert client.rc == 0
        client.subscribe("$dps/registrations/res/#")
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", json.dumps(body))
        topic, payload = client.expect("$dps/registrations/res/")
    finally:
        client.close()
    assert topic.startswith("$dps/registrations/res/") and topic.endswith("/?$rid=1"), topic
    return int(topic.split("/")[3]), json.loads(payload)
