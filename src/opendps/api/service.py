"""DPS service API (CA certificates with proof of possession) and ADR endpoints (namespaces, policies)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import BaseModel, ValidationError

from opendps.api import models as m
from opendps.errors import InvalidInput
from opendps.provisioning import CaCertificates, DpsCertificateView
from opendps.registry import NamespaceView, PolicyView

routes = web.RouteTableDef()


# ---- plumbing ----
async def run(request: web.Request, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """Run blocking domain code in the app's thread pool (never on the event loop)."""
    return await request.app["domain"].run(fn, *args, **kwargs)


async def body(request: web.Request, model: type[BaseModel], *, required: bool = True):  # noqa: ANN201
    raw = await request.read()
    if not raw.strip():
        if required:
            raise InvalidInput(f"request body is required ({model.__name__})")
        return model()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"invalid request body: {where}: {first['msg']}") from exc


def reply(model: BaseModel, status: int = 200, etag: str | None = None) -> web.Response:
    headers = {"ETag": f'"{etag}"'} if etag else None
    return web.Response(status=status, text=model.model_dump_json(exclude_none=True),
                        content_type="application/json", headers=headers)


def rfc1123(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC), usegmt=True)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def thumbprint(cert: x509.Certificate, algo: str = "sha1") -> str:
    return hashlib.new(algo, cert.public_bytes(Encoding.DER)).hexdigest().upper()


def curve_name(cert: x509.Certificate) -> str:
    return {"secp384r1": "P-384", "secp256r1": "P-256"}.get(cert.public_key().curve.name, "?")


# ---- DPS CA certificates ----
def certificate_response(v: DpsCertificateView) -> m.CertificateResponse:
    return m.CertificateResponse(name=v.name, etag=v.etag, properties=m.CertificateProperties(
        subject=v.subject, expiry=rfc1123(v.certificate.not_valid_after_utc), thumbprint=v.sha1,
        sha256Thumbprint=v.sha256, isVerified=v.is_verified, created=rfc1123(v.created_at),
        updated=rfc1123(v.updated_at), certificate=pem(v.certificate), verificationCode=v.verification_code))


OwnerLookup = Callable[[web.Request], Awaitable[CaCertificates]]


def certificate_routes(table: web.RouteTableDef, base: str, owner: OwnerLookup, *, list_route: bool = True) -> None:
    """Proof-of-possession CA certificate routes under ``base`` (``{base}/{cert}``, ``.../generateVerificationCode``,
    ``.../verify``) for the owner ``owner(request)`` returns: DPS, or one hub. Same rules for both."""

    async def put_one(request: web.Request) -> web.Response:
        b = await body(request, m.CertificateBody)
        text = b.properties.certificate if b.properties else b.certificate
        if not text:
            raise InvalidInput("request body needs properties.certificate (PEM or base64 DER)")
        view, created = await run(request, (await owner(request)).upload, request.match_info["cert"], text,
                                  if_match=request.headers.get("If-Match"))
        return reply(certificate_response(view), 201 if created else 200, view.etag)

    async def get_one(request: web.Request) -> web.Response:
        v = await run(request, (await owner(request)).get, request.match_info["cert"])
        return reply(certificate_response(v), etag=v.etag)

    async def delete_one(request: web.Request) -> web.Response:
        await run(request, (await owner(request)).delete, request.match_info["cert"],
                  if_match=request.headers.get("If-Match"))
        return web.Response(status=204)

    async def generate_code(request: web.Request) -> web.Response:
        v = await run(request, (await owner(request)).generate_verification_code, request.match_info["cert"],
                      if_match=request.headers.get("If-Match"))
        return reply(certificate_response(v), etag=v.etag)

    async def verify(request: web.Request) -> web.Response:
        b = await body(request, m.VerificationBody)
        v = await run(request, (await owner(request)).verify, request.match_info["cert"], b.certificate,
                      if_match=request.headers.get("If-Match"))
        return reply(certificate_response(v), etag=v.etag)

    async def list_all(request: web.Request) -> web.Response:
        views = await run(request, (await owner(request)).list)
        return reply(m.CertificateList(value=[certificate_response(v) for v in views]))

    if list_route:
        table.get(base)(list_all)
    table.put(base + "/{cert}")(put_one)
    table.get(base + "/{cert}")(get_one)
    table.delete(base + "/{cert}")(delete_one)
    table.post(base + "/{cert}/generateVerificationCode")(generate_code)
    table.post(base + "/{cert}/verify")(verify)


async def _dps_certificates(request: web.Request) -> CaCertificates:
    return request.app["instance"].ca_certificates


certificate_routes(routes, "/certificates", _dps_certificates)


# ---- ADR ----
def namespace_response(v: NamespaceView) -> m.NamespaceResponse:
    c = v.credential
    return m.NamespaceResponse(name=v.name, etag=v.etag, properties=m.NamespaceProperties(
        createdAt=iso(v.created_at), policies=v.policies, credential=m.CredentialSummary(
            name="default", subject=c.subject.rfc4514_string(), thumbprint=thumbprint(c, "sha256"),
            notBefore=iso(c.not_valid_before_utc), notAfter=iso(c.not_valid_after_utc))))


def policy_response(v: PolicyView) -> m.PolicyResponse:
    ca = v.issuing_ca
    return m.PolicyResponse(name=v.name, etag=v.etag, properties=m.PolicyProperties(
        createdAt=iso(v.created_at), updatedAt=iso(v.updated_at), certificate=m.PolicyCertificateOut(
            certificateAuthorityConfiguration=m.CaConfigurationOut(
                curve=curve_name(ca), subject=ca.subject.rfc4514_string(), thumbprint=thumbprint(ca, "sha256"),
                notBefore=iso(ca.not_valid_before_utc), notAfter=iso(ca.not_valid_after_utc), certificate=pem(ca)),
            leafCertificateConfiguration=m.LeafConfigurationOut(validityPeriodInDays=v.validity_days,
                                                                allowP256=v.allow_p256))))


@routes.put("/namespaces/{ns}")
async def put_namespace(request: web.Request) -> web.Response:
    b = await body(request, m.NamespaceBody, required=False)
    v = await run(request, request.app["instance"].registry.create_namespace, request.match_info["ns"],
                  b.properties.policyName, b.properties.validityPeriodInDays)
    return reply(namespace_response(v), 201, v.etag)


@routes.get("/namespaces")
async def list_namespaces(request: web.Request) -> web.Response:
    views = await run(request, request.app["instance"].registry.list_namespaces)
    return reply(m.NamespaceList(value=[namespace_response(v) for v in views]))


@routes.get("/namespaces/{ns}")
async def get_namespace(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].registry.get_namespace, request.match_info["ns"])
    return reply(namespace_response(v), etag=v.etag)


@routes.delete("/namespaces/{ns}")
async def delete_namespace(request: web.Request) -> web.Response:
    await run(request, request.app["instance"].registry.delete_namespace, request.match_info["ns"])
    return web.Response(status=204)


@routes.get("/namespaces/{ns}/credentials/default")
async def get_credential(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].registry.credential, request.match_info["ns"])
    c = v.certificate
    return reply(m.CredentialResponse(name=v.name, properties=m.CredentialProperties(
        subject=c.subject.rfc4514_string(), thumbprint=thumbprint(c, "sha256"), serialNumber=format(c.serial_number, "X"),
        notBefore=iso(c.not_valid_before_utc), notAfter=iso(c.not_valid_after_utc), curve=curve_name(c),
        certificate=pem(c))))


@routes.put("/namespaces/{ns}/credentials/default/policies/{policy}")
async def put_policy(request: web.Request) -> web.Response:
    b = await body(request, m.PolicyBody, required=False)
    leaf = b.properties.certificate.leafCertificateConfiguration if (
        b.properties and b.properties.certificate) else None
    v, created = await run(request, request.app["instance"].registry.put_policy, request.match_info["ns"],
                           request.match_info["policy"],
                           validity_days=leaf.validityPeriodInDays if leaf else None,
                           allow_p256=leaf.allowP256 if leaf else None, if_match=request.headers.get("If-Match"))
    return reply(policy_response(v), 201 if created else 200, v.etag)


@routes.post("/namespaces/{ns}/credentials/default/policies/{policy}/rotate")
async def rotate_policy(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].registry.rotate_policy, request.match_info["ns"],
                  request.match_info["policy"], if_match=request.headers.get("If-Match"))
    return reply(policy_response(v), etag=v.etag)


@routes.get("/namespaces/{ns}/credentials/default/policies")
async def list_policies(request: web.Request) -> web.Response:
    views = await run(request, request.app["instance"].registry.list_policies, request.match_info["ns"])
    return reply(m.PolicyList(value=[policy_response(v) for v in views]))


@routes.get("/namespaces/{ns}/credentials/default/policies/{policy}")
async def get_policy(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].registry.get_policy, request.match_info["ns"],
                  request.match_info["policy"])
    return reply(policy_response(v), etag=v.etag)


@routes.delete("/namespaces/{ns}/credentials/default/policies/{policy}")
async def delete_policy(request: web.Request) -> web.Response:
    await run(request, request.app["instance"].registry.delete_policy, request.match_info["ns"],
              request.match_info["policy"], if_match=request.headers.get("If-Match"))
    return web.Response(status=204)
