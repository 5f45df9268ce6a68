"""DPS service API (CA certificates with proof of possession) and ADR endpoints (namespaces, policies)."""

from __future__ import annotations

from aiohttp import web
from cryptography import x509

from opendps.frontends.http import models as m
from opendps.frontends.http.certificates import certificate_routes, pem
from opendps.frontends.http.wire import if_match, json_body, run, send, services
from opendps.pki import CaCertificates, serial_hex, thumbprint
from opendps.registry import NamespaceView, PolicyView
from opendps.transport.wire import iso8601

routes = web.RouteTableDef()


# ---- DPS CA certificates ----
async def _dps_certificates(request: web.Request) -> CaCertificates:
    return services(request).ca_certificates


certificate_routes(routes, "/certificates", _dps_certificates)


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


def policy_response(v: PolicyView) -> m.PolicyResponse:
    ca = v.issuing_ca
    return m.PolicyResponse(name=v.name, etag=v.etag, properties=m.PolicyProperties(
        createdAt=iso8601(v.created_at), updatedAt=iso8601(v.updated_at), certificate=m.PolicyCertificateOut(
            certificateAuthorityConfiguration=m.CaConfigurationOut(
                curve=curve_name(ca), subject=ca.subject.rfc4514_string(), thumbprint=thumbprint(ca),
                notBefore=iso8601(ca.not_valid_before_utc), notAfter=iso8601(ca.not_valid_after_utc), certificate=pem(ca)),
            leafCertificateConfiguration=m.LeafConfigurationOut(validityPeriodInDays=v.validity_days,
                                                                allowP256=v.allow_p256))))


@routes.put("/namespaces/{ns}")
async def put_namespace(request: web.Request) -> web.Response:
    b = await json_body(request, m.NamespaceBody, required=False)
    v = await run(request, services(request).registry.create_namespace, request.match_info["ns"],
                  b.properties.policyName, b.properties.validityPeriodInDays)
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
        certificate=pem(c))))


@routes.put("/namespaces/{ns}/credentials/default/policies/{policy}")
async def put_policy(request: web.Request) -> web.Response:
    b = await json_body(request, m.PolicyBody, required=False)
    leaf = b.properties.certificate.leafCertificateConfiguration if (
        b.properties and b.properties.certificate) else None
    v, created = await run(request, services(request).registry.put_policy, request.match_info["ns"],
                           request.match_info["policy"],
                           validity_days=leaf.validityPeriodInDays if leaf else None,
                           allow_p256=leaf.allowP256 if leaf else None, if_match=if_match(request))
    return send(policy_response(v), 201 if created else 200, v.etag)


@routes.post("/namespaces/{ns}/credentials/default/policies/{policy}/rotate")
async def rotate_policy(request: web.Request) -> web.Response:
    v = await run(request, services(request).registry.rotate_policy, request.match_info["ns"],
                  request.match_info["policy"], if_match=if_match(request))
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
