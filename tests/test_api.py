"""Management REST API over real HTTPS against ``opendps serve`` (SQLite and PostgreSQL)."""

from __future__ import annotations

import gzip
import json
import ssl
import time

import httpx
import pytest
from tests.conftest import run_openssl

from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the wire is the subject; the domain runs on both stores in tests/unit (tests/conftest.py)


def _trust(server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.ca_file)

def _client(server, *, token: str | None = None) -> httpx.Client:
    conn = sas.parse_connection_string(server.connection_string)
    if token is None:
        token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"])
    return httpx.Client(base_url=server.url, verify=_trust(server), headers={"Authorization": token},
                        timeout=60)


def _conn(server) -> dict[str, str]:
    return sas.parse_connection_string(server.connection_string)


def _assert_error(resp: httpx.Response, status: int, code: int | None = None, words: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"errorCode", "trackingId", "message", "timestampUtc"}
    assert body["errorCode"] // 1000 == status
    if code is not None:
        assert body["errorCode"] == code
    assert resp.headers["x-ms-error-code"] == str(body["errorCode"])
    assert words.lower() in body["message"].lower(), body["message"]
    return body


def test_no_secret_in_the_server_log(server):
    """Issue 12.13: the banner points to the connection string instead of printing the owner key."""
    log = (server.data_dir.parent / "server.log").read_text()
    assert "opendps dps connection-string show" in log
    assert _conn(server)["SharedAccessKey"] not in log


def test_openapi_is_published_without_auth(server):
    resp = httpx.get(f"{server.url}/openapi.json", verify=_trust(server))
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    assert "/certificates/{name}/verify" in doc["paths"]
    assert "/namespaces/{ns}/credentials/default/policies/{policy}" in doc["paths"]
    assert "CertificateResponse" in doc["components"]["schemas"]


@pytest.mark.parametrize("case", ["missing", "not-sas", "tampered", "expired", "wrong-audience", "wrong-policy",
                                  "wrong-key"])
def test_bad_signatures_get_401(server, case):
    conn = _conn(server)
    host, key, name = conn["HostName"], conn["SharedAccessKey"], conn["SharedAccessKeyName"]
    good = sas.generate(host, key, key_name=name)
    headers = {
        "missing": {},
        "not-sas": {"Authorization": "Bearer abc"},
        "tampered": {"Authorization": good.replace("sig=", "sig=A")},
        "expired": {"Authorization": sas.generate(host, key, key_name=name, ttl=-3600)},
        "wrong-audience": {"Authorization": sas.generate("evil.example", key, key_name=name)},
        "wrong-policy": {"Authorization": sas.generate(host, key, key_name="registryRead")},
        "wrong-key": {"Authorization": sas.generate(host, "QUJDRA==", key_name=name)},
    }[case]
    resp = httpx.get(f"{server.url}/namespaces", headers=headers, verify=_trust(server))
    _assert_error(resp, 401, 401002)
    # and the same signature, made correctly, is accepted: the refusals are about the token
    with _client(server) as c:
        assert c.get("/namespaces").status_code == 200


def test_expired_signature_message_names_expiry(server):
    conn = _conn(server)
    token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"],
                         now=time.time() - 7200)
    resp = httpx.get(f"{server.url}/namespaces", headers={"Authorization": token}, verify=_trust(server))
    _assert_error(resp, 401, 401002, "expired")


def test_namespace_policy_lifecycle(server, tmp_path):
    with _client(server) as c:
        r = c.put("/namespaces/api-ns", json={"properties": {"policyName": "pol-a", "validityPeriodInDays": 3}})
        assert r.status_code == 201, r.text
        assert r.json()["properties"]["policies"] == ["pol-a"]
        _assert_error(c.put("/namespaces/api-ns", json={}), 409, words="already exists")

        cred = c.get("/namespaces/api-ns/credentials/default").json()["properties"]
        assert cred["curve"] == "P-384" and cred["certificate"].startswith("-----BEGIN CERTIFICATE-----")
        root = tmp_path / "root.pem"
        root.write_text(cred["certificate"])

        pol = c.get("/namespaces/api-ns/credentials/default/policies/pol-a").json()
        leaf_cfg = pol["properties"]["certificate"]["leafCertificateConfiguration"]
        assert leaf_cfg == {"validityPeriodInDays": 3, "allowP256": False, "revokeSupersededCertificates": True}
        ica = tmp_path / "ica.pem"
        ica.write_text(pol["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"])
        run_openssl("verify", "-CAfile", str(root), str(ica))

        # update changes validity, with and without a matching etag
        body = {"properties": {"certificate": {"leafCertificateConfiguration": {"validityPeriodInDays": 45}}}}
        _assert_error(c.put("/namespaces/api-ns/credentials/default/policies/pol-a", json=body,
                            headers={"If-Match": '"stale"'}), 412, words="etag")
        r = c.put("/namespaces/api-ns/credentials/default/policies/pol-a", json=body,
                  headers={"If-Match": pol["etag"]})
        assert r.status_code == 200, r.text
        assert r.json()["properties"]["certificate"]["leafCertificateConfiguration"]["validityPeriodInDays"] == 45
        assert r.json()["etag"] != pol["etag"]

        # second policy gets its own issuing CA
        r = c.put("/namespaces/api-ns/credentials/default/policies/pol-b", json={})
        assert r.status_code == 201
        ica_b = r.json()["properties"]["certificate"]["certificateAuthorityConfiguration"]
        assert ica_b["thumbprint"] != pol["properties"]["certificate"]["certificateAuthorityConfiguration"]["thumbprint"]
        names = [p["name"] for p in c.get("/namespaces/api-ns/credentials/default/policies").json()["value"]]
        assert names == ["pol-a", "pol-b"]

        # issue 17: revocation settings, the policy's issuing CAs, revoking a retired one
        pol_a = "/namespaces/api-ns/credentials/default/policies/pol-a"
        body = {"properties": {"certificate": {"certificateAuthorityConfiguration": {"crlValidityInHours": 6},
                                               "leafCertificateConfiguration": {"revokeSupersededCertificates": False}}}}
        r = c.put(pol_a, json=body)
        assert r.status_code == 200, r.text
        cert_cfg = r.json()["properties"]["certificate"]
        assert cert_cfg["certificateAuthorityConfiguration"]["crlValidityInHours"] == 6
        assert cert_cfg["leafCertificateConfiguration"] == {"validityPeriodInDays": 45, "allowP256": False,
                                                           "revokeSupersededCertificates": False}
        body["properties"]["certificate"]["certificateAuthorityConfiguration"]["crlValidityInHours"] = 0
        _assert_error(c.put(pol_a, json=body), 400, words="crlValidityInHours")
        [active] = c.get(f"{pol_a}/issuingCas").json()["value"]
        assert active["status"] == "active" and active["certificate"].startswith("-----BEGIN CERTIFICATE-----")
        _assert_error(c.post(f"{pol_a}/issuingCas/{active['serialNumber']}/revoke", json={}), 409, words="rotate")
        assert c.post(f"{pol_a}/rotate").status_code == 200
        new, old = c.get(f"{pol_a}/issuingCas").json()["value"]
        assert (new["status"], old["serialNumber"]) == ("active", active["serialNumber"])
        _assert_error(c.post(f"{pol_a}/issuingCas/{old['thumbprint']}/revoke", json={"reason": "oops"}), 400,
                      words="reason")
        r = c.post(f"{pol_a}/issuingCas/{old['thumbprint']}/revoke", json={"reason": "keyCompromise"})
        assert r.status_code == 200, r.text
        assert r.json()["revokedCertificateCount"] == 0
        assert (r.json()["issuingCa"]["status"], r.json()["issuingCa"]["revocationReason"]) == ("revoked",
                                                                                                "keyCompromise")
        _assert_error(c.post(f"{pol_a}/issuingCas/{old['serialNumber']}/revoke", json={}), 409, words="already")
        _assert_error(c.post(f"{pol_a}/issuingCas/0102/revoke", json={}), 404, words="no issuing CA")
        r = c.post(f"{pol_a}/revokeCertificates", json={"reason": "cessationOfOperation"})
        assert (r.status_code, r.json()) == (200, {"revokedCertificateCount": 0})
        _assert_error(c.post("/namespaces/api-ns/credentials/default/policies/nope/revokeCertificates", json={}),
                      404, words="nope")

        assert c.delete("/namespaces/api-ns/credentials/default/policies/pol-b").status_code == 204
        _assert_error(c.get("/namespaces/api-ns/credentials/default/policies/pol-b"), 404, words="pol-b")
        assert c.delete("/namespaces/api-ns").status_code == 204
        _assert_error(c.get("/namespaces/api-ns"), 404, words="api-ns")


@pytest.mark.parametrize("days", [0, 91, -1, "30", 1.5, True])
def test_policy_validity_out_of_range_is_400(server, days):
    with _client(server) as c:
        body = {"properties": {"certificate": {"leafCertificateConfiguration": {"validityPeriodInDays": days}}}}
        r = c.put("/namespaces/bad-days/credentials/default/policies/p", json=body)
        # the namespace does not exist, but the body is checked first or the 404 names the namespace
        assert r.status_code in (400, 404)
        c.put("/namespaces/bad-days", json={})
        _assert_error(c.put("/namespaces/bad-days/credentials/default/policies/p", json=body), 400,
                      words="validityPeriodInDays")
        _assert_error(c.get("/namespaces/bad-days/credentials/default/policies/p"), 404)
        _assert_error(c.put(f"/namespaces/bad-days-{abs(hash(str(days))) % 1000}",
                            json={"properties": {"validityPeriodInDays": days}}), 400, words="validityPeriodInDays")


def test_malformed_bodies_and_names(server):
    with _client(server) as c:
        _assert_error(c.put("/namespaces/x1", content=b"{not json"), 400, words="JSON")
        _assert_error(c.put("/namespaces/-bad", json={}), 400, words="namespace name")
        _assert_error(c.put("/certificates/c1", json={"properties": {}}), 400, words="certificate")
        _assert_error(c.put("/certificates/c1", json={"properties": {"certificate": "not a cert"}}), 400,
                      words="certificate")
        _assert_error(c.get("/no/such/route"), 404)
        assert c.get("/certificates/c1").status_code == 404


def test_certificate_proof_of_possession_over_api(server, tmp_path):
    run_openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
                "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=api-pop-ca",
                "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign",
                cwd=tmp_path)
    with _client(server) as c:
        r = c.put("/certificates/api-pop", json={"properties": {"certificate": (tmp_path / "ca.pem").read_text()}})
        assert r.status_code == 201, r.text
        cert = r.json()
        assert cert["properties"]["isVerified"] is False
        assert r.headers["ETag"].strip('"') == cert["etag"]
        _assert_error(c.post("/certificates/api-pop/generateVerificationCode"), 412, words="etag")
        _assert_error(c.post("/certificates/api-pop/generateVerificationCode", headers={"If-Match": "nope"}), 412)
        r = c.post("/certificates/api-pop/generateVerificationCode", headers={"If-Match": cert["etag"]})
        assert r.status_code == 200
        code, etag = r.json()["properties"]["verificationCode"], r.json()["etag"]
        run_openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout",
                    "v.key", "-out", "v.csr", "-subj", f"/CN={code}", cwd=tmp_path)
        run_openssl("x509", "-req", "-in", "v.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", "v.pem", "-days", "1", "-sha256", cwd=tmp_path)
        proof = {"certificate": (tmp_path / "v.pem").read_text()}
        _assert_error(c.post("/certificates/api-pop/verify", json=proof, headers={"If-Match": cert["etag"]}), 412)
        r = c.post("/certificates/api-pop/verify", json=proof, headers={"If-Match": etag})
        assert r.status_code == 200, r.text
        assert r.json()["properties"]["isVerified"] is True
        assert c.get("/certificates/api-pop").json()["properties"]["isVerified"] is True
        listed = c.get("/certificates").json()["value"]
        assert [x["name"] for x in listed if x["name"] == "api-pop"] == ["api-pop"]
        _assert_error(c.delete("/certificates/api-pop", headers={"If-Match": "wrong"}), 412)
        assert c.delete("/certificates/api-pop", headers={"If-Match": r.json()["etag"]}).status_code == 204


def test_deep_json_and_huge_numbers_are_400s_not_500s(server):
    """Issue 12.5: nesting the parser cannot follow, and numbers that overflow, are refused by name on every route."""
    deep = b"[" * 30000 + b"]" * 30000
    with _client(server) as c:
        _assert_error(c.put("/enrollments/deep", content=deep), 400, 400004, "nested more than 32 levels")
        _assert_error(c.put("/namespaces/deep", content=deep), 400, 400004, "nested more than")
        assert c.put("/devices/deep-dev", json={"deviceId": "deep-dev"}).status_code == 200
        _assert_error(c.patch("/twins/deep-dev", content=deep), 400, 400004, "nested more than")
        patch = '{"a":' * 975 + "{}" + "}" * 975  # valid JSON, 976 levels: deeper than any twin may be
        _assert_error(c.patch("/twins/deep-dev", content=f'{{"properties": {{"desired": {patch}}}}}'.encode()),
                      400, 400004, "nested more than")
        nested_ok = {"a": {"b": {"c": 1}}}
        assert c.patch("/twins/deep-dev", json={"properties": {"desired": nested_ok}}).status_code == 200
        for ttl in ("9" * 400, "inf", "nan", "-5", "1e400"):
            _assert_error(c.post("/devices/deep-dev/messages/deviceBound", content=b"x", headers={"iothub-ttl": ttl}),
                          400, 400004, "time-to-live")
    with httpx.Client(base_url=server.url, verify=_trust(server), timeout=60) as d:
        _assert_error(d.put(f"/{server.id_scope}/registrations/deep-dev/register", content=deep), 413, 413001,
                      "registration body is larger than")  # the device API's 32 KiB limit comes first
        _assert_error(d.put(f"/{server.id_scope}/registrations/deep-dev/register", content=deep[:10000] + deep[-10000:]),
                      400, 400004, "registration body is nested more than")
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log and "RecursionError" not in log and "OverflowError" not in log


def test_sdk_spellings_and_unmatched_paths(server):
    """Issue 12.21/22: collection names lower-cased and trailing slashes are served; an unmatched path is a 404
    before any credential is looked at (not 403 'may only use the hub service API')."""
    out = server.cli("hub", "connection-string", "show", check=True)
    cs = out.stdout.strip()
    cs = sas.parse_connection_string(json.loads(cs)["connectionString"] if cs.startswith("{") else cs)
    hub_token = sas.generate(cs["HostName"], cs["SharedAccessKey"], "iothubowner")
    with _client(server) as c:
        r = c.put("/enrollmentgroups/spelled-group", json={"attestation": {"type": "symmetricKey"}})
        assert r.status_code == 201, r.text
        mech = c.post("/enrollmentgroups/spelled-group/attestationmechanism")
        assert mech.status_code == 200 and mech.json()["symmetricKey"]["primaryKey"]
        assert c.get("/enrollmentGroups/spelled-group").status_code == 200
    with _client(server, token=hub_token) as hub:
        assert hub.get("/devices/").status_code == 200 and isinstance(hub.get("/devices/").json(), list)
        _assert_error(hub.get("/no/such/path"), 404, 404001)
        _assert_error(hub.get("/enrollments/spelled-group"), 403, 403002, "may only use the hub service API")
    with httpx.Client(base_url=server.url, verify=_trust(server), timeout=60) as anonymous:
        _assert_error(anonymous.get("/no/such/path"), 404, 404001)


def test_device_list_is_bounded_by_top_as_in_iot_hub(server):
    """GET /devices?top=N: at most N identities in device id order; absent or outside 1-1000 means 1000; a top that is
    not a number is a 400 naming it."""
    out = server.cli("hub", "connection-string", "show", check=True)
    cs = out.stdout.strip()
    cs = sas.parse_connection_string(json.loads(cs)["connectionString"] if cs.startswith("{") else cs)
    hub_token = sas.generate(cs["HostName"], cs["SharedAccessKey"], "iothubowner")
    with _client(server, token=hub_token) as hub:
        for device_id in ("top-c", "top-a", "top-b"):
            assert hub.put(f"/devices/{device_id}", json={"deviceId": device_id}).status_code in (200, 201)
        everything = [d["deviceId"] for d in hub.get("/devices").json()]
        assert {"top-a", "top-b", "top-c"} <= set(everything) and everything == sorted(everything, key=str.lower)
        first_two = [d["deviceId"] for d in hub.get("/devices", params={"top": 2}).json()]
        assert first_two == everything[:2]
        for outside in (0, -5, 1001):
            assert [d["deviceId"] for d in hub.get("/devices", params={"top": outside}).json()] == everything
        _assert_error(hub.get("/devices", params={"top": "lots"}), 400, 400004, "top must be an integer")
        # opendps also says where the next page starts (x-ms-continuation), and the pages add up to the whole list
        pages, token = [], None
        while True:
            r = hub.get("/devices", params={"top": 2}, headers={"x-ms-continuation": token} if token else {})
            assert r.status_code == 200 and len(r.json()) <= 2
            pages.append([d["deviceId"] for d in r.json()])
            token = r.headers.get("x-ms-continuation")
            if token is None:
                break
        assert [d for p in pages for d in p] == everything and all(pages)
        assert "x-ms-continuation" not in hub.get("/devices").headers  # everything fits in one page of 1000
        _assert_error(hub.get("/devices", headers={"x-ms-continuation": "%%%"}), 400, 400004,
                      "x-ms-continuation is not one this service gave")


def test_malformed_http_is_one_info_line_not_an_error_traceback(server):
    """Issue 12.14: expected client behaviour (a bad header, an overlong line) logs one INFO line."""
    import socket

    for payload in (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 70000 + b"\r\n\r\n"):
        port = int(server.url.rsplit(":", 1)[1])
        with _trust(server).wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
            try:
                s.sendall(payload)
            except (ssl.SSLError, OSError):
                continue  # answered and closed before the whole overlong line was sent: the log below decides
            head = b""
            while b"\r\n" not in head and (chunk := s.recv(64)):
                head += chunk
            assert head.split(b" ")[1] == b"400", head
    deadline = time.time() + 5
    while time.time() < deadline:
        log = (server.data_dir.parent / "server.log").read_text()
        if log.count("malformed request, answered 400") >= 2:
            break
        time.sleep(0.1)
    assert log.count("malformed request, answered 400") >= 2, log[-2000:]
    assert "ERROR aiohttp.server" not in log and "Traceback" not in log


def _policy_token(server, name: str, key: str) -> str:
    return sas.generate(_conn(server)["HostName"], key, key_name=name)


def test_access_policy_rights_decide_the_routes(server):
    """Issue 12.18: a policy's rights, per route: enrollments read/write, registration states read/write, and
    ServiceConfig for the rest (certificates, access policies); the hub service API is not theirs."""
    tokens = {}
    with _client(server) as owner:
        for name, rights in (("api-enr-read", "EnrollmentRead"), ("api-reg-read", ["RegistrationStatusRead"]),
                             ("api-reg-write", "RegistrationStatusWrite")):
            r = owner.put(f"/accessPolicies/{name}", json={"rights": rights})
            assert r.status_code == 201, r.text
            assert r.json() == {"keyName": name, "rights": rights if isinstance(rights, str) else rights[0]}
            keys = owner.get(f"/accessPolicies/{name}/keys").json()
            assert keys["keyName"] == name and keys["primaryKey"] != keys["secondaryKey"]
            tokens[name] = _policy_token(server, name, keys["primaryKey"])
        listed = owner.get("/accessPolicies").json()["value"]
        assert {"keyName": "provisioningserviceowner", "rights": "ServiceConfig, DeviceConnect, EnrollmentWrite"} \
            in listed and all(set(p) == {"keyName", "rights"} for p in listed)  # keys only on the keys routes
        assert owner.put("/enrollments/api-rights-dev", json={"attestation": {"type": "symmetricKey"}}
                         ).status_code == 201
    with _client(server, token=tokens["api-enr-read"]) as reader:
        assert reader.get("/enrollments/api-rights-dev").status_code == 200
        assert reader.post("/enrollments/query", json={"query": "*"}).status_code == 200
        _assert_error(reader.put("/enrollments/api-rights-dev", json={"attestation": {"type": "symmetricKey"}}),
                      401, 401002, "lacks the EnrollmentWrite right")
        _assert_error(reader.delete("/enrollments/api-rights-dev"), 401, 401002, "EnrollmentWrite")
        _assert_error(reader.get("/certificates"), 401, 401002, "lacks the ServiceConfig right")
        _assert_error(reader.put("/certificates/api-x", json={"certificate": "x"}), 401, 401002, "ServiceConfig")
        _assert_error(reader.get("/accessPolicies"), 401, 401002, "ServiceConfig")
        _assert_error(reader.get("/devices"), 401, 401002, "may not use the hub service API")
    with _client(server, token=tokens["api-reg-read"]) as status_reader:
        _assert_error(status_reader.get("/registrations/api-rights-dev"), 404)  # let through: there is none yet
        _assert_error(status_reader.delete("/registrations/api-rights-dev"), 401, 401002,
                      "lacks the RegistrationStatusWrite right")
        _assert_error(status_reader.get("/enrollments/api-rights-dev"), 401, 401002, "EnrollmentRead")
    with _client(server, token=tokens["api-reg-write"]) as status_writer:
        _assert_error(status_writer.delete("/registrations/api-rights-dev"), 404)  # let through
        _assert_error(status_writer.get("/registrations/api-rights-dev"), 404)  # Write implies Read
        _assert_error(status_writer.put("/enrollments/api-rights-dev", json={}), 401, 401002, "EnrollmentWrite")


def test_access_policy_keys_renewal_deletion_and_refusals(server):
    """Issue 12.18: a renewed key stops the old token at once and the new one works; a deleted policy's token is
    refused; the owner cannot be deleted; bad input is a 4xx with Azure's body, never a 500."""
    with _client(server) as owner:
        assert owner.put("/accessPolicies/api-rotate", json={"rights": "ServiceConfig"},
                         headers={"If-None-Match": "*"}).status_code == 201
        keys = owner.get("/accessPolicies/api-rotate/keys").json()
        old, secondary = (_policy_token(server, "api-rotate", keys[k]) for k in ("primaryKey", "secondaryKey"))
        with _client(server, token=old) as c:
            assert c.get("/accessPolicies/api-rotate").json() == {"keyName": "api-rotate", "rights": "ServiceConfig"}
        renewed = owner.post("/accessPolicies/api-rotate/keys/renew", json={"renewKey": "primary"})
        assert renewed.status_code == 200, renewed.text
        new = renewed.json()
        assert new["primaryKey"] != keys["primaryKey"] and new["secondaryKey"] == keys["secondaryKey"]
        with _client(server, token=old) as c:
            _assert_error(c.get("/accessPolicies"), 401, 401002, "signature does not verify")
        for token in (_policy_token(server, "api-rotate", new["primaryKey"]), secondary):
            with _client(server, token=token) as c:
                assert c.get("/accessPolicies").status_code == 200
        swapped = owner.post("/accessPolicies/api-rotate/keys/renew", json={"renewKey": "swap"}).json()
        assert (swapped["primaryKey"], swapped["secondaryKey"]) == (new["secondaryKey"], new["primaryKey"])

        assert owner.delete("/accessPolicies/api-rotate").status_code == 204
        with _client(server, token=secondary) as c:
            _assert_error(c.get("/accessPolicies"), 401, 401002, "not an access policy")
        _assert_error(owner.get("/accessPolicies/api-rotate"), 404, words="no access policy")

        _assert_error(owner.delete("/accessPolicies/provisioningserviceowner"), 409, 409002, "cannot be deleted")
        _assert_error(owner.put("/accessPolicies/provisioningserviceowner", json={"rights": "EnrollmentWrite"}),
                      409, words="only one with ServiceConfig")
        for path, body, headers, status, words in [
            ("/accessPolicies/api-bad", {"rights": "ServiceConfig, RegistryWrite"}, {}, 400, "unknown right"),
            ("/accessPolicies/api-bad", {"rights": ""}, {}, 400, "at least one right"),
            ("/accessPolicies/api-bad", {"rights": 5}, {}, 400, "rights"),
            ("/accessPolicies/api-bad", {}, {}, 400, "rights"),
            ("/accessPolicies/api%20bad", {"rights": "ServiceConfig"}, {}, 400, "is invalid"),
            ("/accessPolicies/iothubowner", {"rights": "ServiceConfig"}, {}, 400, "reserved"),
            ("/accessPolicies/api-bad", {"rights": "ServiceConfig", "primaryKey": "%%"}, {}, 400, "base64"),
            ("/accessPolicies/provisioningserviceowner", {"rights": "ServiceConfig"}, {"If-None-Match": "*"}, 409,
             "already exists"),
            ("/accessPolicies/api-bad", {"rights": "ServiceConfig"}, {"If-Match": "*"}, 404, "no access policy"),
        ]:
            _assert_error(owner.put(path, json=body, headers=headers), status, words=words)
        _assert_error(owner.post("/accessPolicies/provisioningserviceowner/keys/renew", json={"renewKey": "third"}),
                      400, words="primary, secondary or swap")
        _assert_error(owner.post("/accessPolicies/provisioningserviceowner/keys/renew"), 400, words="required")
        _assert_error(owner.get("/accessPolicies/api-bad/keys"), 404)
        assert owner.get("/accessPolicies").status_code == 200  # the owner's own token still works
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log and keys["primaryKey"] not in log and new["primaryKey"] not in log


def test_what_other_sdks_send_to_the_service_api(server):
    """Siblings of issue 12.21/22 found by reading Microsoft's Node, C#, C and Java SDKs (docs/sdk-compat-audit.md):
    bulk enrollment operations (all four, Node and C with a trailing slash), enrollment queries written in SQL
    (Java, C# samples), a twin PATCH sent as POST + X-HTTP-Method-Override (Java's service SDK)."""
    sym = {"attestation": {"type": "symmetricKey"}}
    with _client(server) as c:
        r = c.post("/enrollments/", json={"mode": "create", "enrollments": [
            {**sym, "registrationId": "sdk-bulk-1"}, {**sym, "registrationId": "sdk-bulk-2"}]})
        assert r.status_code == 200 and r.json() == {"isSuccessful": True, "errors": []}, r.text
        r = c.post("/enrollments", json={"mode": "create", "enrollments": [{**sym, "registrationId": "sdk-bulk-1"}]})
        assert r.status_code == 200 and not r.json()["isSuccessful"]
        [error] = r.json()["errors"]
        assert error["registrationId"] == "sdk-bulk-1" and error["errorCode"] // 1000 == 409 and error["errorStatus"]
        r = c.post("/enrollmentGroups", json={"mode": "update", "enrollmentGroups": [
            {**sym, "enrollmentGroupId": "sdk-bulk-group"}]})
        assert r.json() == {"isSuccessful": True, "errors": []}
        assert c.get("/enrollmentGroups/sdk-bulk-group").status_code == 200
        _assert_error(c.post("/enrollments", json={"mode": "merge", "enrollments": []}), 400, 400004, "mode must be")
        r = c.post("/enrollments", json={"mode": "delete", "enrollments": [{"registrationId": "sdk-bulk-2"}]})
        assert r.json()["isSuccessful"] and c.get("/enrollments/sdk-bulk-2").status_code == 404

        for query, path in [("select * from enrollments", "/enrollments/query"),
                            ("SELECT * FROM enrollmentGroups", "/enrollmentGroups/query"),
                            ("  *  ", "/enrollments/query")]:
            r = c.post(path, json={"query": query})
            assert r.status_code == 200 and isinstance(r.json(), list), (query, r.text)
        _assert_error(c.post("/enrollments/query", json={"query": "SELECT * FROM enrollments WHERE x = 1"}), 400,
                      400004, "without WHERE")
        # paged as the SDKs page: x-ms-max-item-count in, x-ms-continuation out while more follow
        for i in range(3):
            assert c.put(f"/enrollments/sdk-page-{i}", json={**sym, "registrationId": f"sdk-page-{i}"}).status_code in (
                200, 201)
        everything = [e["registrationId"] for e in c.post("/enrollments/query", json={"query": "*"}).json()]
        assert len(everything) >= 3
        walked, token, pages = [], None, 0
        while True:
            r = c.post("/enrollments/query", json={"query": "*"},
                       headers={"x-ms-max-item-count": "2", **({"x-ms-continuation": token} if token else {})})
            assert r.status_code == 200 and r.headers["x-ms-item-type"] == "Enrollment" and len(r.json()) <= 2
            walked += [e["registrationId"] for e in r.json()]
            pages += 1
            token = r.headers.get("x-ms-continuation")
            if token is None:
                break
        assert walked == everything and pages == (len(everything) + 1) // 2
        _assert_error(c.post("/enrollments/query", json={"query": "*"}, headers={"x-ms-continuation": "x"}), 400,
                      400004, "must be integers")

        assert c.put("/devices/sdk-java-twin", json={"deviceId": "sdk-java-twin"}).status_code == 200
        r = c.post("/twins/sdk-java-twin", json={"tags": {"site": "lab"}}, headers={"X-HTTP-Method-Override": "PATCH"})
        assert r.status_code == 200 and r.json()["tags"] == {"site": "lab"}, r.text
        r = c.post("/twins/sdk-java-twin", json={"tags": {"line": "b"}}, headers={"X-HTTP-Method-Override": "put"})
        assert r.status_code == 200 and r.json()["tags"] == {"line": "b"}, r.text
        _assert_error(c.post("/twins/sdk-java-twin", json={"tags": {}}), 405, 405001, "method POST is not allowed")
        page = c.post("/devices/query", json={"query": "SELECT * FROM devices WHERE tags.line = 'b'"})
        assert page.headers["x-ms-item-type"] == "Twin" and [t["deviceId"] for t in page.json()] == ["sdk-java-twin"]


def _settled_log(server, marker: str, count: int) -> str:
    """The server log once ``marker`` appears ``count`` times (aiohttp logs about a request after answering it)."""
    deadline = time.time() + 5
    while True:
        log = (server.data_dir.parent / "server.log").read_text()
        if log.count(marker) >= count or time.time() > deadline:
            return log
        time.sleep(0.1)


def test_bodies_that_do_not_decode_are_400s_not_500s(server):
    """A body whose Content-Encoding does not decode (gzip or deflate that is not) is a 400 naming it, on a connection
    closed after the answer (aiohttp's parser gave up on the stream), on every kind of route: never a 500, an ERROR
    traceback in the log, or a second, plain-text answer on the same connection."""
    garbage = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    with _client(server) as c:
        for method, path in (("PUT", "/accessPolicies/gzip-garbage"), ("PUT", "/devices/gzip-garbage"),
                             ("PATCH", "/twins/gzip-garbage"), ("POST", "/enrollments/query")):
            for encoding in ("gzip", "deflate"):
                r = c.request(method, path, content=b"not compressed", headers={**garbage, "Content-Encoding": encoding})
                _assert_error(r, 400, 400004, f"request body cannot be read: Can not decode content-encoding: {encoding}")
                assert r.headers["Connection"] == "close"
        _assert_error(c.get("/accessPolicies/gzip-garbage"), 404)  # nothing written, and the client goes on
        assert c.put("/accessPolicies/gzip-fine", content=gzip.compress(b'{"rights": "EnrollmentRead"}'),
                     headers=garbage).status_code == 201  # what does decode is served as before
    with httpx.Client(base_url=server.url, verify=_trust(server), timeout=60) as d:  # the device API reads its own way
        _assert_error(d.put(f"/{server.id_scope}/registrations/gzip-dev/register", content=b"not compressed",
                            headers=garbage), 400, 400004, "content-encoding")
    log = _settled_log(server, "Unhandled exception: malformed request, answered 400", 9)
    assert log.count("malformed request body in") >= 9
    assert "Traceback" not in log and "ERROR aiohttp.server" not in log and "internal error" not in log


def test_body_members_of_the_wrong_type_are_400s_not_500s(server):
    """Members a route reads into must be JSON objects: anything else is a 400 naming the member, not an
    AttributeError (a 500); and a thumbprint must be a string."""
    with _client(server) as c:
        for body, words in (({"authentication": True}, "authentication must be a JSON object"),
                            ({"authentication": {"symmetricKey": "k"}}, "authentication.symmetricKey must be a JSON"),
                            ({"authentication": {"x509Thumbprint": [1]}}, "authentication.x509Thumbprint must be a JSON"),
                            ({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": 5}}},
                             "x509Thumbprint.primaryThumbprint must be 40")):
            _assert_error(c.put("/devices/wrong-types", json=body), 400, 400004, words)
        _assert_error(c.get("/devices/wrong-types"), 404)
        _assert_error(c.put("/linkedHubs/wrong-types", json={"properties": "x"}), 400, 400004,
                      "properties must be a JSON object")
        _assert_error(c.get("/linkedHubs/wrong-types"), 404)


def test_names_ending_in_a_newline_are_refused_not_written(server):
    """The name rules are regular expressions ending in ``$``, which also matches before a final newline: ``nl-ns\\n``
    and its kin used to be created (a namespace's name goes into its CA certificates' subjects)."""
    sym = {"attestation": {"type": "symmetricKey"}}
    nats = {"url": "nats://127.0.0.1:4222", "isEnabled": False}
    with _client(server) as c:
        for path, body, words in (
                ("/namespaces/nl-ns%0A", {}, "namespace name"),
                ("/namespaces/nl-ns/credentials/default/policies/nl-policy%0A", {}, "name"),
                ("/accessPolicies/nl-policy%0A", {"rights": "EnrollmentRead"}, "access policy name"),
                ("/enrollments/nl-enrollment%0A", sym, "registration id"),
                ("/enrollmentGroups/nl-group%0A", sym, "enrollment group id"),
                ("/devices/nl-device%0A", {}, "device id"),
                ("/devices/nl-thumb", {"authentication": {"type": "selfSigned", "x509Thumbprint": {
                    "primaryThumbprint": "AB" * 20 + "\n"}}}, "primaryThumbprint must be 40"),
                ("/linkedHubs/default/routes/nl-route%0A", {"properties": nats}, "route name"),
                ("/linkedHubs/default/routes/nl-subject", {"properties": {**nats, "subject": "a.b\n"}}, "subject"),
                ("/linkedHubs/nl-host", {"properties": {"hostName": "nl-host.localhost\n"}}, "host name")):
            _assert_error(c.put(path, json=body), 400, 400004, words)
        assert c.put("/namespaces/nl-ns", json={}).status_code == 201  # the names without the newline are fine
        assert [n["name"] for n in c.get("/namespaces").json()["value"] if n["name"].startswith("nl-")] == ["nl-ns"]
        assert not [p for p in c.get("/accessPolicies").json()["value"] if p["keyName"].startswith("nl-")]
        assert not [r for r in c.get("/linkedHubs/default/routes").json()["value"] if r["name"].startswith("nl-")]
        assert not [h for h in c.get("/linkedHubs").json()["value"] if h["name"].startswith("nl-")]
        assert not [d for d in c.get("/devices").json() if d["deviceId"].startswith("nl-")]
        assert c.delete("/namespaces/nl-ns").status_code == 204


def test_text_no_database_can_hold_is_a_400(server):
    """A lone UTF-16 surrogate escape in a JSON body is not text (RFC 7493), and a NUL cannot be a device id: a 400
    naming the problem, where the database's encoder used to fail (a 500)."""
    lone = '{"deviceId": "a\\ud800", "namespace": "x"}'
    with _client(server) as c:
        for path, text in (("/deviceCertificates/revoke", lone),
                           ("/deviceCertificates/revoke", '{"deviceId": "a", "namespace": "\\udfff"}'),
                           ("/namespaces/lone-surrogate", '{"properties": {"policyName": "p\\ud800"}}')):
            _assert_error(c.request("POST" if "revoke" in path else "PUT", path, content=text.encode(),
                                    headers={"Content-Type": "application/json"}), 400, 400004, "lone UTF-16 surrogate")
        _assert_error(c.post("/deviceCertificates/revoke", json={"deviceId": "a\u0000b"}), 400, 400004, "device id")
        _assert_error(c.post("/deviceCertificates/revoke", json={"deviceId": "a", "namespace": "a\u0000b"}), 400,
                      400004, "namespace name")
        _assert_error(c.get("/deviceCertificates", params={"deviceId": "a\u0000b"}), 400, 400004, "NUL character")
        pair = '{"tags": {"smile": "\\ud83d\\ude00"}}'  # a surrogate pair is one character, and welcome
        assert c.put("/devices/surrogate-pair", json={}).status_code == 200
        r = c.patch("/twins/surrogate-pair", content=pair.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["tags"] == {"smile": "\U0001f600"}, r.text


def test_values_the_domain_parses_or_binds_are_checked_first(server):
    """Body values that reached a parser or a SQL statement unchecked, each a 500: a namespaceName that is not a
    string, a certificate that is a number, URLs with an unbalanced IPv6 bracket (``urlsplit`` raises), and an
    x-ms-continuation past what SQLite binds as an integer."""
    sym = {"attestation": {"type": "symmetricKey"}}
    with _client(server) as c:
        assert c.put("/namespaces/bind-ns", json={"properties": {"policyName": "bind-p"}}).status_code == 201
        for bad in (10**30, [], {}, 5):
            _assert_error(c.put("/enrollments/bind-enrollment", json={**sym, "credentialPolicyName": "bind-p",
                                                                      "namespaceName": bad}), 400, 400004,
                          "namespace name")
        _assert_error(c.put("/enrollments/bind-enrollment", json={"attestation": {"type": "x509", "x509": {
            "clientCertificates": {"primary": {"certificate": 5}}}}}), 400, 400004, "must be a PEM or base64 DER string")
        _assert_error(c.put("/enrollments/bind-enrollment", json={**sym, "allocationPolicy": "custom",
                                                                  "customAllocationDefinition": {
                                                                      "webhookUrl": "https://[::1/allocate"}}),
                      400, 400004, "webhookUrl")
        _assert_error(c.get("/enrollments/bind-enrollment"), 404)
        _assert_error(c.put("/linkedHubs/default/routes/bind-route", json={"properties": {
            "url": "nats://[::1", "isEnabled": False}}), 400, 400004, "is not a NATS server URL")
        _assert_error(c.post("/enrollments/query", json={"query": "*"}, headers={"x-ms-continuation": "9" * 30}), 400,
                      400004, "x-ms-continuation 0-")
        r = c.put("/enrollments/bind-enrollment", json={**sym, "credentialPolicyName": "bind-p", "namespaceName": "bind-ns"})
        assert r.status_code == 201, r.text
        assert c.delete("/enrollments/bind-enrollment").status_code == 204


def test_a_nul_in_the_path_or_query_is_a_400_before_any_lookup(server):
    """``%00`` decodes to U+0000, which no name or id holds and PostgreSQL cannot even compare: every lookup by a path
    segment or ``?hub=`` was its DataError there (a 500). Refused by name on every route, before credentials too."""
    with _client(server) as c:
        for method, path in (("DELETE", "/namespaces/a%00b"), ("DELETE", "/enrollments/%00"),
                             ("POST", "/enrollments/a%00b/attestationmechanism"), ("DELETE", "/registrations/%00"),
                             ("DELETE", "/linkedHubs/default/routes/a%00"), ("PATCH", "/twins/a%00b"),
                             ("POST", "/twins/a%00b/methods"), ("POST", "/devices/a%00b/messages/deviceBound"),
                             ("PUT", "/devices/nul-hub?hub=%00"), ("DELETE", "/certificates/a%00b")):
            _assert_error(c.request(method, path, json={}), 400, 400004, "NUL character")
    with httpx.Client(base_url=server.url, verify=_trust(server), timeout=60) as d:
        _assert_error(d.post(f"/{server.id_scope}/registrations/a%00b", json={}), 400, 400004, "NUL character")
