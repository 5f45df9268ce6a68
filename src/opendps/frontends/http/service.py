"""DPS service API (CA certificates with proof of possession, shared access policies) and ADR endpoints
(namespaces, policies)."""

from __future__ import annotations

from aiohttp import web
from cryptography import x509

from opendps.errors import InvalidInput
from opendps.frontends.http import models as m
from opendps.frontends.http.certificates import certificate_routes, pem
from opendps.frontends.http.wire import if_match, json_body, run, runtime, send, services
from opendps.pki import CaCertificates, IssuedCertificateView, KeyCustody, revocation_reason, serial_hex, thumbprint
from opendps.provisioning.access import AccessPolicyView
from opendps.registry import IssuingCaView, NamespaceView, PolicyView
from opendps.services import Services
from opendps.transport.wire import iso8601

routes = web.RouteTableDef()


# ---- DPS CA certificates ----
async def _dps_certificates(request: web.Request) -> CaCertificates:
    return services(request).ca_certificates


certificate_routes(routes, "/certificates", _dps_certificates)


# ---- DPS shared access policies (az iot dps policy); keys only on the keys routes ----
def access_policy_response(v: AccessPolicyView) -> m.AccessPolicyResponse:
    return m.AccessPolicyResponse(keyName=v.name, rights=v.rights_text)


async def _access_policy_keys(request: web.Request, keys: tuple[str, str]) -> web.Response:
    v = await run(request, services(request).access_policies.get, request.match_info["name"])
    return send(m.AccessPolicyKeys(keyName=v.name, rights=v.rights_text, primaryKey=keys[0], secondaryKey=keys[1]))


@routes.get("/accessPolicies")
async def list_access_policies(request: web.Request) -> web.Response:
    views = await run(request, services(request).access_policies.list)
    return send(m.AccessPolicyList(value=[access_policy_response(v) for v in views]))


@routes.get("/accessPolicies/{name}")
async def get_access_policy(request: web.Request) -> web.Response:
    v = await run(request, services(request).access_policies.get, request.match_info["name"])
    return send(access_policy_response(v))


@routes.put("/accessPolicies/{name}")
async def put_access_policy(request: web.Request) -> web.Response:
    """Create (201) or update (200) rights, and the keys given; ``If-None-Match: *`` creates only (409 if it
    exists), ``If-Match: *`` updates only (404 if it does not)."""
    b = await json_body(request, m.AccessPolicyBody)
    exists: bool | None = None
    if request.headers.get("If-None-Match") is not None:
        if request.headers["If-None-Match"].strip() != "*":
            raise InvalidInput("If-None-Match takes only * here (create only)")
        exists = False
    if (match := if_match(request)) is not None:
        if match.strip().strip('"') != "*":
            raise InvalidInput("If-Match takes only * here (update only): access policies have no etag")
        exists = True
    v, created = await run(request, services(request).access_policies.put, request.match_info["name"], b.rights,
                           primary_key=b.primaryKey, secondary_key=b.secondaryKey, exists=exists)
    await runtime(request).access_policies_changed()
    return send(access_policy_response(v), 201 if created else 200)


@routes.delete("/accessPolicies/{name}")
async def delete_access_policy(request: web.Request) -> web.Response:
    await run(request, services(request).access_policies.delete, request.match_info["name"])
    await runtime(request).access_policies_changed()
    return web.Response(status=204)


@routes.get("/accessPolicies/{name}/keys")
async def get_access_policy_keys(request: web.Request) -> web.Response:
    keys = await run(request, services(request).access_policies.keys_of, request.match_info["name"])
    return await _access_policy_keys(request, keys)


@routes.post("/accessPolicies/{name}/keys/renew")
async def renew_access_policy_key(request: web.Request) -> web.Response:
    """``{"renewKey": "primary" | "secondary" | "swap"}``; tokens signed with a replaced key stop working."""
    b = await json_body(request, m.RenewKeyBody)
    keys = await run(request, services(request).access_policies.renew_key, request.match_info["name"], b.renewKey)
    await runtime(request).access_policies_changed()
    return await _access_policy_keys(request, keys)


# ---- ADR ----
def curve_name(cert: x509.Certificate) -> str:
    key = cert.public_key()
    curve = getattr(key, "curve", None)
    return {"secp384r1": "P-384", "secp256r1": "P-256"}.get(curve.name if curve else "", "?")


def namespace_response(v: NamespaceView) -> m.NamespaceResponse:
    c = v.credential
    return m.NamespaceResponse(name=v.name, etag=v.etag, properties=m.NamespaceProperties(
        createdAt=iso8601(v.created_at), policies=v.policies, credential=m.CredentialSummary(
            name="default", subject=c.subject.rfc4514_string(), thumbprint=thumbprint(c),
            notBefore=iso8601(c.not_valid_before_utc), notAfter=iso8601(c.not_valid_after_utc))))


def _custody(key: KeyCustody | None) -> dict[str, str | None]:
    """keyBackend, tokenLabel, keyLabel: where a CA's private key is (never any key material)."""
    if key is None:
        return {"keyBackend": "software"}
    return {"keyBackend": key.backend, "tokenLabel": key.token, "keyLabel": key.label}


def policy_response(v: PolicyView) -> m.PolicyResponse:
    ca = v.issuing_ca
    return m.PolicyResponse(name=v.name, etag=v.etag, properties=m.PolicyProperties(
        createdAt=iso8601(v.created_at), updatedAt=iso8601(v.updated_at), certificate=m.PolicyCertificateOut(
            certificateAuthorityConfiguration=m.CaConfigurationOut(
                curve=curve_name(ca), subject=ca.subject.rfc4514_string(), thumbprint=thumbprint(ca),
                notBefore=iso8601(ca.not_valid_before_utc), notAfter=iso8601(ca.not_valid_after_utc), certificate=pem(ca),
                crlValidityInHours=v.crl_validity_hours, **_custody(v.key)),
            leafCertificateConfiguration=m.LeafConfigurationOut(validityPeriodInDays=v.validity_days,
                                                                allowP256=v.allow_p256,
                                                                revokeSupersededCertificates=v.revoke_superseded))))


@routes.put("/namespaces/{ns}")
async def put_namespace(request: web.Request) -> web.Response:
    b = await json_body(request, m.NamespaceBody, required=False)
    v = await run(request, services(request).registry.create_namespace, request.match_info["ns"],
                  b.properties.policyName, b.properties.validityPeriodInDays, key_backend=b.properties.keyBackend,
                  policy_key_backend=b.properties.policyKeyBackend)
    return send(namespace_response(v), 201, v.etag)


@routes.get("/namespaces")
async def list_namespaces(request: web.Request) -> web.Response:
    views = await run(request, services(request).registry.list_namespaces)
    return send(m.NamespaceList(value=[namespace_response(v) for v in views]))


@routes.get("/namespaces/{ns}")
async def get_namespace(request: web.Request) -> web.Response:
    v = await run(request, services(request).registry.get_namespace, request.match_info["ns"])
    return send(namespace_response(v), etag=v.etag)


@routes.delete("/namespaces/{ns}")
async def delete_namespace(request: web.Request) -> web.Response:
    await run(request, services(request).registry.delete_namespace, request.match_info["ns"])
    return web.Response(status=204)


@routes.get("/namespaces/{ns}/credentials/default")
async def get_credential(request: web.Request) -> web.Response:
    v = await run(request, services(request).registry.credential, request.match_info["ns"])
    c = v.certificate
    return send(m.CredentialResponse(name=v.name, properties=m.CredentialProperties(
        subject=c.subject.rfc4514_string(), thumbprint=thumbprint(c), serialNumber=serial_hex(c),
        notBefore=iso8601(c.not_valid_before_utc), notAfter=iso8601(c.not_valid_after_utc), curve=curve_name(c),
        certificate=pem(c), **_custody(v.key))))


@routes.put("/namespaces/{ns}/credentials/default/policies/{policy}")
async def put_policy(request: web.Request) -> web.Response:
    b = await json_body(request, m.PolicyBody, required=False)
    leaf = b.properties.certificate.leafCertificateConfiguration if (
        b.properties and b.properties.certificate) else None
    ca = b.properties.certificate.certificateAuthorityConfiguration if (
        b.properties and b.properties.certificate) else None
    v, created = await run(request, services(request).registry.put_policy, request.match_info["ns"],
                           request.match_info["policy"],
                           validity_days=leaf.validityPeriodInDays if leaf else None,
                           allow_p256=leaf.allowP256 if leaf else None,
                           revoke_superseded=leaf.revokeSupersededCertificates if leaf else None,
                           crl_validity_hours=ca.crlValidityInHours if ca else None,
                           key_backend=ca.keyBackend if ca else None, if_match=if_match(request))
    return send(policy_response(v), 201 if created else 200, v.etag)


@routes.post("/namespaces/{ns}/credentials/default/policies/{policy}/rotate")
async def rotate_policy(request: web.Request) -> web.Response:
    b = await json_body(request, m.RotateBody, required=False)
    v = await run(request, services(request).registry.rotate_policy, request.match_info["ns"],
                  request.match_info["policy"], if_match=if_match(request), key_backend=b.keyBackend)
    return send(policy_response(v), etag=v.etag)


@routes.get("/namespaces/{ns}/credentials/default/policies")
async def list_policies(request: web.Request) -> web.Response:
    views = await run(request, services(request).registry.list_policies, request.match_info["ns"])
    return send(m.PolicyList(value=[policy_response(v) for v in views]))


@routes.get("/namespaces/{ns}/credentials/default/policies/{policy}")
async def get_policy(request: web.Request) -> web.Response:
    v = await run(request, services(request).registry.get_policy, request.match_info["ns"],
                  request.match_info["policy"])
    return send(policy_response(v), etag=v.etag)


@routes.delete("/namespaces/{ns}/credentials/default/policies/{policy}")
async def delete_policy(request: web.Request) -> web.Response:
    await run(request, services(request).registry.delete_policy, request.match_info["ns"],
              request.match_info["policy"], if_match=if_match(request))
    return web.Response(status=204)


# ---- issued (operational) certificates and their revocation (issue 17) ----
def issued_certificate_response(v: IssuedCertificateView) -> m.IssuedCertificateResponse:
    return m.IssuedCertificateResponse(
        serialNumber=v.serial_number, sha256Thumbprint=v.sha256.upper(), registrationId=v.registration_id,
        notBefore=iso8601(v.not_before), notAfter=iso8601(v.not_after), issuedAt=iso8601(v.created_at),
        revoked=v.revoked, revokedAt=iso8601(v.revoked_at) if v.revoked_at else None,
        revocationReason=v.revocation_reason)


def _issued_certificates(s: Services, device_id: str | None, namespace: str | None) -> list[IssuedCertificateView]:
    """The registry names whose certificates a device's (its registration ids) and a namespace's (its issuing CAs)
    are; the CA lists them."""
    rids = s.devices.registration_ids(device_id, namespace) if device_id else None
    cas = s.devices.issuing_ca_ids(namespace) if namespace else None
    return s.issuance.list(registration_ids=rids, issuing_ca_ids=cas)


def _revoke_device(s: Services, device_id: str, namespace: str | None, reason: str | None) -> list[IssuedCertificateView]:
    """The registry names the device's registration ids (and the namespace's CAs); the CA revokes, in one transaction."""
    reason = revocation_reason(reason)  # a bad reason is refused before anything is looked up
    return s.issuance.revoke_registrations(s.devices.registration_ids(device_id, namespace), reason,
                                           issuing_ca_ids=s.devices.issuing_ca_ids(namespace) if namespace else None)


@routes.get("/deviceCertificates")
async def list_issued_certificates(request: web.Request) -> web.Response:
    views = await run(request, _issued_certificates, services(request), request.query.get("deviceId") or None,
                      request.query.get("namespace") or None)
    return send(m.IssuedCertificateList(value=[issued_certificate_response(v) for v in views]))


@routes.get("/deviceCertificates/{serial}")
async def get_issued_certificate(request: web.Request) -> web.Response:
    v = await run(request, services(request).issuance.get, request.match_info["serial"])
    return send(issued_certificate_response(v))


@routes.post("/deviceCertificates/{serial}/revoke")
async def revoke_certificate(request: web.Request) -> web.Response:
    """Revoke one certificate, then drop the live sessions holding it on every node."""
    b = await json_body(request, m.RevokeBody, required=False)
    v = await run(request, services(request).issuance.revoke, request.match_info["serial"], b.reason)
    await runtime(request).live.revoke({v.serial_number})
    return send(issued_certificate_response(v))


@routes.post("/deviceCertificates/revoke")
async def revoke_device_certificates(request: web.Request) -> web.Response:
    """Revoke every unrevoked certificate of a device (none left: an empty list), then drop its live sessions."""
    b = await json_body(request, m.RevokeDeviceBody)
    views = await run(request, _revoke_device, services(request), b.deviceId, b.namespace, b.reason)
    await runtime(request).live.revoke({v.serial_number for v in views})
    return send(m.IssuedCertificateList(value=[issued_certificate_response(v) for v in views]))


# ---- a policy's issuing CAs; revoking one, or every certificate under a policy (issue 17) ----
def issuing_ca_response(v: IssuingCaView) -> m.IssuingCaResponse:
    c = v.certificate
    return m.IssuingCaResponse(
        serialNumber=serial_hex(c), thumbprint=thumbprint(c), subject=c.subject.rfc4514_string(), status=v.status,
        notBefore=iso8601(c.not_valid_before_utc), notAfter=iso8601(c.not_valid_after_utc),
        createdAt=iso8601(v.created_at), revokedAt=iso8601(v.revoked_at) if v.revoked_at else None,
        revocationReason=v.revocation_reason, certificate=pem(c))


def _key_ids(certificates: list[x509.Certificate]) -> set[str]:
    """The subject key identifiers of CAs: live sessions are dropped by their certificates' issuer."""
    return {c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex() for c in certificates}


def _revoke_policy_certificates(s: Services, namespace: str, policy: str, reason: str | None) -> tuple[int, set[str]]:
    """The registry names the policy's issuing CAs; the CA revokes everything they signed, in one statement."""
    reason = revocation_reason(reason)
    ids, certificates = s.registry.policy_issuing_ca_ids(namespace, policy)
    return s.issuance.revoke_issued_by(ids, reason, audit_scope={"namespace": namespace, "policy": policy}), _key_ids(
        certificates)


@routes.get("/namespaces/{ns}/credentials/default/policies/{policy}/issuingCas")
async def list_issuing_cas(request: web.Request) -> web.Response:
    views = await run(request, services(request).registry.list_issuing_cas, request.match_info["ns"],
                      request.match_info["policy"])
    return send(m.IssuingCaList(value=[issuing_ca_response(v) for v in views]))


@routes.post("/namespaces/{ns}/credentials/default/policies/{policy}/issuingCas/{ca}/revoke")
async def revoke_issuing_ca(request: web.Request) -> web.Response:
    """Revoke a retired issuing CA and every leaf it signed (409 for the active one: rotate first); hubs stop
    trusting it at once and live sessions holding its leaves are dropped on every node."""
    b = await json_body(request, m.RevokeBody, required=False)
    s = services(request)
    done = await run(request, s.registry.revoke_issuing_ca, request.match_info["ns"], request.match_info["policy"],
                     request.match_info["ca"], b.reason, s.issuance)
    await runtime(request).live.revoke(set(), issuers=_key_ids([done.ca.certificate]))
    return send(m.IssuingCaRevocationResponse(issuingCa=issuing_ca_response(done.ca),
                                              revokedCertificateCount=done.leaves_revoked))


@routes.post("/namespaces/{ns}/credentials/default/policies/{policy}/revokeCertificates")
async def revoke_policy_certificates(request: web.Request) -> web.Response:
    """Revoke every unrevoked certificate issued under the policy (by any of its issuing CAs, past or present);
    the policy goes on issuing. Live sessions holding them are dropped on every node."""
    b = await json_body(request, m.RevokeBody, required=False)
    count, issuers = await run(request, _revoke_policy_certificates, services(request), request.match_info["ns"],
                               request.match_info["policy"], b.reason)
    await runtime(request).live.revoke(set(), issuers=issuers)
    return send(m.RevokedCount(revokedCertificateCount=count))
