"""CRLs and OCSP over real sockets (issue 17.3): one ``opendps serve --workers 2`` on PostgreSQL, its plain-HTTP
listener (SO_REUSEPORT: either worker answers) and its HTTPS one, checked with the real openssl CLI — ``openssl crl
-CAfile``, ``openssl verify -crl_check_all`` and ``openssl ocsp -url`` at the URLs the certificates name — before and
after a revocation through the REST API, after a policy rotation, and after the retired issuing CA is revoked;
pkilint on what was served; malformed requests and unknown CAs answered as the protocols say.

The builders and the responder's caching are tested in-process on both backends (tests/unit/pki/); this module
checks the wire once.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID
from tests.conftest import _run_server, database, run_openssl, wait_until
from tests.test_device_api import assert_azure_error, csr_b64, device_sas, namespace, register, svc, sym_key

from opendps.pki import lint_certificate, lint_crl, lint_ocsp_response
from opendps.pki.status import ca_ref

pytestmark = pytest.mark.timeout(300, func_only=True)
NS, POLICY = "status-ns", "status-p"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("status")
    with database("postgresql", tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path, extra_args=("--workers", "2"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("status-files")


def _pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    return path


def _provision(server, c: httpx.Client, rid: str, files: Path) -> list[x509.Certificate]:
    """A device with a symmetric-key enrollment under the policy: its chain [leaf, issuing CA, root]."""
    key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60) as d:
        _, result = register(server, d, rid, headers={"Authorization": device_sas(server.id_scope, rid, key)},
                             body={"registrationId": rid, "csr": csr_b64(files, rid)})
    assert result is not None and result["status"] == "assigned", result
    return [x509.load_der_x509_certificate(base64.b64decode(b))
            for b in result["registrationState"]["issuedCertificateChain"]]


def _crl_url(cert: x509.Certificate) -> str:
    points = cert.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    return points[0].full_name[0].value


def _ocsp_url(cert: x509.Certificate) -> str:
    access = cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    assert [d.access_method for d in access] == [AuthorityInformationAccessOID.OCSP]  # no caIssuers: leaves stay small
    return access[0].access_location.value


def _fetch_crl(url: str, path: Path) -> bytes:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl", r.text
    path.write_bytes(r.content)
    return r.content


def _ocsp(files: Path, issuer: Path, cert: Path, url: str) -> str:
    out = run_openssl("ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url", url, "-CAfile",
                      str(files / "root.pem"), "-no_nonce", "-resp_text", cwd=files)
    assert "Response verify OK" in out.stdout + out.stderr, out
    return out.stdout


def _revoke(server, serial: str, reason: str) -> None:
    with svc(server) as c:
        r = c.post(f"/deviceCertificates/{serial}/revoke", json={"reason": reason})
        assert r.status_code == 200, r.text


def test_crl_and_ocsp_follow_revocations_and_rotation_with_openssl(server, files):
    with svc(server) as c:
        namespace(c, NS, POLICY)
        leaf, ica, root = _provision(server, c, "status-good", files)
        doomed, _, _ = _provision(server, c, "status-doomed", files)
    _pem(files / "root.pem", root), _pem(files / "ica.pem", ica), _pem(files / "chain.pem", root, ica)
    _pem(files / "good.pem", leaf), _pem(files / "doomed.pem", doomed)
    base = f"http://127.0.0.1:{server.http_port}"
    # the certificates name this installation's plain-HTTP listener: the leaf its issuing CA's CRL and the OCSP
    # responder, the issuing CA its root's CRL; the root names nothing
    assert _crl_url(leaf) == f"{base}/crl/{ca_ref(ica)}.crl" and _ocsp_url(leaf) == f"{base}/ocsp"
    root_url = f"{base}/crl/{ca_ref(root)}.crl"
    assert _crl_url(ica) == root_url
    with pytest.raises(x509.ExtensionNotFound):
        root.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS)
    for cert in (leaf, ica):
        assert lint_certificate(cert.public_bytes(Encoding.DER)) == []

    # both CRLs verify with openssl, and pkilint passes them
    ica_crl = _fetch_crl(_crl_url(leaf), files / "ica.crl")
    root_crl = _fetch_crl(root_url, files / "root.crl")
    for crl_file, ca_file in (("ica.crl", "chain.pem"), ("root.crl", "root.pem")):
        out = run_openssl("crl", "-in", crl_file, "-inform", "DER", "-CAfile", ca_file, "-noout", cwd=files)
        assert "verify OK" in out.stdout + out.stderr
    assert lint_crl(ica_crl) == [] and lint_crl(root_crl) == []

    def verify(cert: str) -> tuple[int, str]:
        """``openssl verify`` with both CRLs as last fetched (the issuing CA's for the leaf, the root's for the CA)."""
        (files / "crls.pem").write_bytes(b"".join(x509.load_der_x509_crl((files / name).read_bytes()).public_bytes(
            Encoding.PEM) for name in ("ica.crl", "root.crl")))
        proc = subprocess.run(["openssl", "verify", "-crl_check_all", "-CRLfile", "crls.pem", "-CAfile", "chain.pem",
                               cert], cwd=files, capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr

    assert verify("doomed.pem") == (0, "doomed.pem: OK\n")
    # OCSP: good, from the URL in the leaf
    assert "doomed.pem: good" in _ocsp(files, files / "ica.pem", files / "doomed.pem", _ocsp_url(doomed))

    # revoke through the REST API: OCSP says so at once, every worker's CRL within a second or two
    _revoke(server, format(doomed.serial_number, "X"), "keyCompromise")
    said = _ocsp(files, files / "ica.pem", files / "doomed.pem", _ocsp_url(doomed))
    assert "doomed.pem: revoked" in said and "Reason: keyCompromise" in said, said

    def listed() -> bool:
        crl = x509.load_der_x509_crl(_fetch_crl(_crl_url(leaf), files / "ica.crl"))
        return crl.get_revoked_certificate_by_serial_number(doomed.serial_number) is not None

    assert all(wait_until(listed, 2.0, 0.1) for _ in range(4)), "a worker's CRL does not list the revocation within 2 s"
    code, text = verify("doomed.pem")
    assert code != 0 and "certificate revoked" in text, text
    assert verify("good.pem") == (0, "good.pem: OK\n")
    assert "good.pem: good" in _ocsp(files, files / "ica.pem", files / "good.pem", _ocsp_url(leaf))

    # a policy rotation: the retired CA keeps publishing and answering for its leaves
    with svc(server) as c:
        assert c.post(f"/namespaces/{NS}/credentials/default/policies/{POLICY}/rotate").status_code == 200
        fresh, new_ica, _ = _provision(server, c, "status-fresh", files)
    assert new_ica != ica and _crl_url(fresh) == f"{base}/crl/{ca_ref(new_ica)}.crl"
    assert "good.pem: good" in _ocsp(files, files / "ica.pem", files / "good.pem", _ocsp_url(leaf))
    _revoke(server, format(leaf.serial_number, "X"), "superseded")
    said = _ocsp(files, files / "ica.pem", files / "good.pem", _ocsp_url(leaf))
    assert "good.pem: revoked" in said and "Reason: superseded" in said, said
    assert wait_until(lambda: {e.serial_number for e in x509.load_der_x509_crl(
        _fetch_crl(_crl_url(leaf), files / "ica.crl"))} == {doomed.serial_number, leaf.serial_number}, 2.0, 0.1)
    _pem(files / "new-ica.pem", new_ica), _pem(files / "fresh.pem", fresh)
    assert "fresh.pem: good" in _ocsp(files, files / "new-ica.pem", files / "fresh.pem", _ocsp_url(fresh))

    # the retired issuing CA revoked by its root: the root's CRL lists it (every node, by the configuration counter)
    with svc(server) as c:
        r = c.post(f"/namespaces/{NS}/credentials/default/policies/{POLICY}/issuingCas/{format(ica.serial_number, 'X')}"
                   "/revoke", json={"reason": "keyCompromise"})
        assert r.status_code == 200, r.text
    root_listing = x509.load_der_x509_crl(_fetch_crl(root_url, files / "root.crl"))
    entry = root_listing.get_revoked_certificate_by_serial_number(ica.serial_number)
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        == x509.ReasonFlags.key_compromise
    assert lint_crl(root_listing.public_bytes(Encoding.DER)) == []
    out = run_openssl("crl", "-in", "root.crl", "-inform", "DER", "-CAfile", "root.pem", "-noout", cwd=files)
    assert "verify OK" in out.stdout + out.stderr


def test_the_status_endpoints_speak_http_as_rfc_5019_says(server, files):
    """Run after the flow above (same module): GET with the request in the path, caching headers, HTTPS too,
    malformed requests, unknown CAs."""
    leaf = x509.load_pem_x509_certificate((files / "fresh.pem").read_bytes())
    ica = x509.load_pem_x509_certificate((files / "new-ica.pem").read_bytes())
    request = x509_ocsp.OCSPRequestBuilder().add_certificate(leaf, ica, hashes.SHA1()).build().public_bytes(Encoding.DER)
    base = f"http://127.0.0.1:{server.http_port}"
    with httpx.Client(base_url=base, timeout=30) as plain, \
            httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                         timeout=30) as tls:  # no token: open
        for client in (plain, tls):
            posted = client.post("/ocsp", content=request, headers={"Content-Type": "application/ocsp-request"})
            got = client.get("/ocsp/" + quote(base64.b64encode(request).decode(), safe=""))
            for r in (posted, got):
                assert r.status_code == 200 and r.headers["content-type"] == "application/ocsp-response", r.text
                answer = x509_ocsp.load_der_ocsp_response(r.content)
                assert answer.certificate_status == x509_ocsp.OCSPCertStatus.GOOD
                assert lint_ocsp_response(r.content) == []
                # RFC 5019 6.2: cacheable until nextUpdate
                assert r.headers["Expires"] and r.headers["Last-Modified"] and r.headers["ETag"]
                directives = r.headers["Cache-Control"].split(", ")
                assert directives[1:] == ["public", "no-transform", "must-revalidate"]
                assert 0 < int(directives[0].removeprefix("max-age=")) <= 24 * 3600
            crl = client.get(f"/crl/{ca_ref(ica)}.crl")
            assert crl.status_code == 200 and x509.load_der_x509_crl(crl.content).issuer == ica.subject
            again = client.get(f"/crl/{ca_ref(ica)}.crl", headers={"If-None-Match": crl.headers["ETag"]})
            assert again.status_code in (200, 304)  # 304 from the worker that built it, 200 (its own) from another
            head = client.head(f"/crl/{ca_ref(ica)}.crl")
            assert head.status_code == 200 and head.content == b""
            # malformed: OCSP's own status, never an HTTP error (a body whose Content-Encoding does not decode too,
            # on a connection closed after the answer: aiohttp's parser gave up on it)
            undecodable = client.post("/ocsp", content=b"not gzip", headers={"Content-Encoding": "gzip"})
            assert undecodable.headers.get("Connection") == "close", undecodable.text
            for r in (client.post("/ocsp", content=b"not DER"), client.get("/ocsp/not%20base64!"),
                      client.post("/ocsp", content=request + b"\x00"), undecodable):
                assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store", r.text
                status = x509_ocsp.load_der_ocsp_response(r.content).response_status
                assert status == x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            # a CA not published here
            assert_azure_error(client.get("/crl/0123456789abcdef.crl"), 404, "no certificate authority")
            missing = client.head("/crl/0123456789abcdef.crl")
            assert missing.status_code == 404 and missing.headers["x-ms-error-code"] == "404001"
