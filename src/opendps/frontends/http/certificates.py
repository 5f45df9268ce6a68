"""Proof-of-possession CA certificate routes, shared by DPS (``/certificates``) and each hub
(``/linkedHubs/{name}/certificates``): same rules, same shapes, the owner's table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from opendps.errors import InvalidInput
from opendps.frontends.http import models as m
from opendps.frontends.http.wire import if_match, json_body, run, send
from opendps.pki import CaCertificates, CaCertificateView
from opendps.transport.wire import rfc1123


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def certificate_response(v: CaCertificateView) -> m.CertificateResponse:
    return m.CertificateResponse(name=v.name, etag=v.etag, properties=m.CertificateProperties(
        subject=v.subject, expiry=rfc1123(v.certificate.not_valid_after_utc), thumbprint=v.sha1,
        sha256Thumbprint=v.sha256, isVerified=v.is_verified, created=rfc1123(v.created_at),
        updated=rfc1123(v.updated_at), certificate=pem(v.certificate), verificationCode=v.verification_code))


OwnerLookup = Callable[[web.Request], Awaitable[CaCertificates]]


def certificate_routes(table: web.RouteTableDef, base: str, owner: OwnerLookup, *, list_route: bool = True) -> None:
    """Proof-of-possession CA certificate routes under ``base`` (``{base}/{cert}``, ``.../generateVerificationCode``,
    ``.../verify``) for the owner ``owner(request)`` returns: DPS, or one hub. Same rules for both."""

    async def put_one(request: web.Request) -> web.Response:
        b = await json_body(request, m.CertificateBody)
        text = b.properties.certificate if b.properties else b.certificate
        if not text:
            raise InvalidInput("request body needs properties.certificate (PEM or base64 DER)")
        view, created = await run(request, (await owner(request)).upload, request.match_info["cert"], text,
                                  if_match=if_match(request))
        return send(certificate_response(view), 201 if created else 200, view.etag)

    async def get_one(request: web.Request) -> web.Response:
        v = await run(request, (await owner(request)).get, request.match_info["cert"])
        return send(certificate_response(v), etag=v.etag)

    async def delete_one(request: web.Request) -> web.Response:
        await run(request, (await owner(request)).delete, request.match_info["cert"],
                  if_match=if_match(request))
        return web.Response(status=204)

    async def generate_code(request: web.Request) -> web.Response:
        v = await run(request, (await owner(request)).generate_verification_code, request.match_info["cert"],
                      if_match=if_match(request))
        return send(certificate_response(v), etag=v.etag)

    async def verify(request: web.Request) -> web.Response:
        b = await json_body(request, m.VerificationBody)
        v = await run(request, (await owner(request)).verify, request.match_info["cert"], b.certificate,
                      if_match=if_match(request))
        return send(certificate_response(v), etag=v.etag)

    async def list_all(request: web.Request) -> web.Response:
        views = await run(request, (await owner(request)).list)
        return send(m.CertificateList(value=[certificate_response(v) for v in views]))

    if list_route:
        table.get(base)(list_all)
    table.put(base + "/{cert}")(put_one)
    table.get(base + "/{cert}")(get_one)
    table.delete(base + "/{cert}")(delete_one)
    table.post(base + "/{cert}/generateVerificationCode")(generate_code)
    table.post(base + "/{cert}/verify")(verify)
