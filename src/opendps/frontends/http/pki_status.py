"""Certificate status for relying parties: each CA's CRL and the issuing CAs' OCSP responder (issue 17.3).

Served without credentials on the plain-HTTP listener (``--http-port``: relying parties fetch CRLs and OCSP over
plain HTTP, as RFC 5280 and RFC 5019 expect; the documents are signed) and on the HTTPS one, by the same handlers:

- ``GET /crl/{ca}.crl``: the CA's current CRL, DER, ``application/pkix-crl`` (404 with an Azure error body for a CA
  not published here);
- ``POST /ocsp`` (body: a DER ``application/ocsp-request``) and ``GET /ocsp/{base64 request}`` (RFC 5019 / RFC 6960
  appendix A): ``application/ocsp-response``, always HTTP 200 — a request that is not one is answered with OCSP's
  own ``malformedRequest``, an issuer not published here with ``unauthorized``.

Caching (RFC 5019 6.2): a signed document says ``Last-Modified`` (its thisUpdate), ``Expires`` (its nextUpdate),
``Cache-Control: max-age=<seconds left until nextUpdate>, public, no-transform, must-revalidate`` and an ``ETag``
(``If-None-Match`` answers 304; without it, on a GET or HEAD, so does an ``If-Modified-Since`` in a later second
than the document's thisUpdate); unsigned OCSP errors are ``no-store``. The documents themselves are built and cached by
:class:`opendps.pki.StatusResponder` in the domain thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TypeVar
from urllib.parse import unquote

from aiohttp import web

from opendps.errors import ServiceUnavailable
from opendps.frontends.http.wire import run, services
from opendps.pki import StatusDocument
from opendps.pki.ocsp import MAX_REQUEST_BYTES, TRY_LATER

PKI_ROUTE_PREFIX = "pki:"  # open routes: no service token (frontends.http.app's SAS middleware lets them pass)
OCSP_GET_ROUTE = PKI_ROUTE_PREFIX + "ocsp-get"
CRL_TYPE = "application/pkix-crl"
OCSP_TYPE = "application/ocsp-response"

routes = web.RouteTableDef()

# Anyone may ask, and an OCSP answer about a made-up serial still costs a signature: at most STATUS_SLOTS requests
# are in the domain thread pool at once (the rest of the pool stays for registrations and the hub) and at most
# STATUS_WAITING wait for a slot; beyond that OCSP answers tryLater and a CRL request 503 (RFC 6960 4.2.1).
STATUS_SLOTS = 2
STATUS_WAITING = 64
T = TypeVar("T")


class StatusGate:
    """This process's budget for status requests (one per application, made on the loop that serves it)."""

    def __init__(self, slots: int = STATUS_SLOTS, waiting: int = STATUS_WAITING) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._room = waiting + slots
        self.admitted = 0  # in a slot or waiting for one

    async def admit(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()`` (a domain-pool call) within the budget; None when the budget is spent."""
        if self.admitted >= self._room:
            return None
        self.admitted += 1
        try:
            async with self._slots:
                return await call()
        finally:
            self.admitted -= 1


STATUS_GATE = web.AppKey("opendps_status_gate", StatusGate)


def add_status_routes(app: web.Application) -> None:
    """The CRL and OCSP routes on ``app``, with that application's own :class:`StatusGate`."""
    app[STATUS_GATE] = StatusGate()
    app.add_routes(routes)


def _gate(request: web.Request) -> StatusGate:
    return request.app[STATUS_GATE]


def _http_date(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC), usegmt=True)


def _respond(request: web.Request, document: StatusDocument, content_type: str) -> web.Response:
    if document.this_update is None or document.next_update is None:  # an unsigned OCSP error status
        return web.Response(body=document.der, content_type=content_type, headers={"Cache-Control": "no-store"})
    left = int((document.next_update - datetime.now(UTC)).total_seconds())
    etag = f'"{document.etag}"'
    headers = {
        "Last-Modified": _http_date(document.this_update),
        "Expires": _http_date(document.next_update),
        "Cache-Control": f"max-age={max(0, left)}, public, no-transform, must-revalidate",
        "ETag": etag,
    }
    if "If-None-Match" in request.headers:  # RFC 9110 13.1.3: If-Modified-Since is ignored when it is present
        if etag in {t.strip() for t in request.headers["If-None-Match"].split(",")}:
            return web.Response(status=304, headers=headers)
    # without an ETag to match, a client's copy (from any process) made in a later second than this one is fresh.
    # Not the same second: HTTP dates and a CRL's thisUpdate have whole seconds, and a revocation can be followed by a
    # new CRL within the second of the copy the client holds; it must get that one (200), not a 304
    elif request.method in ("GET", "HEAD") and request.if_modified_since is not None \
            and document.this_update.replace(microsecond=0) < request.if_modified_since:
        return web.Response(status=304, headers=headers)
    return web.Response(body=document.der, content_type=content_type, headers=headers)


@routes.get("/crl/{ca}.crl", name=PKI_ROUTE_PREFIX + "crl")
async def get_crl(request: web.Request) -> web.Response:
    """A CA's CRL (``{ca}``: the 16 hex digits its certificates' CRL Distribution Points name)."""
    status = services(request).status
    document = await _gate(request).admit(lambda: run(request, status.crl, request.match_info["ca"]))
    if document is None:
        raise ServiceUnavailable("too many certificate status requests at once; retry later")
    return _respond(request, document, CRL_TYPE)


@routes.post("/ocsp", name=PKI_ROUTE_PREFIX + "ocsp")
async def post_ocsp(request: web.Request) -> web.Response:
    """An OCSP request in the body (``application/ocsp-request``)."""
    body, unreadable = b"", False
    if request.content_length is None or request.content_length <= MAX_REQUEST_BYTES:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = b""  # answered as malformed, like an oversized request
        except web.RequestPayloadError:  # a Content-Encoding that does not decode: malformed too
            unreadable = True
    status = services(request).status
    document = await _gate(request).admit(lambda: run(request, status.ocsp, body[:MAX_REQUEST_BYTES + 1]))
    response = _respond(request, document or StatusDocument(TRY_LATER), OCSP_TYPE)
    if unreadable:
        response.force_close()  # aiohttp's parser gave up on the stream: this connection serves no further request
    return response


def _decode_get(path_part: str) -> bytes:
    """The request of ``GET /ocsp/{...}``: base64 of the DER, URL-encoded (RFC 6960 A.1); also accepted unencoded,
    in the URL-safe alphabet and without padding, as clients send it. Empty when it is not base64."""
    text = unquote(path_part).strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


@routes.get("/ocsp/{request:.+}", name=OCSP_GET_ROUTE)
async def get_ocsp(request: web.Request) -> web.Response:
    """An OCSP request in the path (RFC 5019 5: what an HTTP cache can keep)."""
    raw = request.raw_path.split("?", 1)[0][len("/ocsp/"):]  # undecoded: '+' and '%2F' are base64, not separators
    status, query = services(request).status, _decode_get(raw)
    document = await _gate(request).admit(lambda: run(request, status.ocsp, query))
    return _respond(request, document or StatusDocument(TRY_LATER), OCSP_TYPE)


__all__ = ["OCSP_GET_ROUTE", "PKI_ROUTE_PREFIX", "add_status_routes"]
