"""The fleet dashboard's static files, served at ``/ui/`` on the HTTPS listener (issue 19).

The page holds no secret and needs none to be fetched, so its routes are open (named ``ui:*``: the SAS middleware
lets them pass). Everything it shows it asks of the management API itself, with ``Authorization:
SharedAccessSignature ...`` tokens it signs in the browser (WebCrypto HMAC-SHA256) from the connection string the
user pastes; the key never crosses the wire (``docs/architecture.md``, "Fleet dashboard").

Plain HTML, one script and one style sheet, shipped as package data (``static/``): no build step, no CDN, so it
works on an air-gapped installation. Served from memory with a strict Content-Security-Policy (scripts and styles
from this origin only, no inline script, API calls to this origin only), so markup that slipped into a device id
or a refusal message can never run as script.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

UI_ROUTE_PREFIX = "ui:"  # open routes: static files without secrets (frontends.http.app's SAS middleware lets them pass)
STATIC = Path(__file__).resolve().parent / "static"
FILES = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated (ETag): an upgrade's new page is used at once
}

routes = web.RouteTableDef()
_cache: dict[str, tuple[bytes, str]] = {}  # file name -> (content, etag): the package's files, read once per process


def _file(name: str) -> tuple[bytes, str]:
    if name not in _cache:
        data = (STATIC / name).read_bytes()
        _cache[name] = (data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return _cache[name]


def _serve(request: web.Request, name: str) -> web.Response:
    data, etag = _file(name)
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type=FILES[name], charset="utf-8", headers=headers)


@routes.get("/ui", name=UI_ROUTE_PREFIX + "redirect")
async def ui_redirect(_request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/ui/")


@routes.get("/ui/", name=UI_ROUTE_PREFIX + "index")
async def ui_index(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


@routes.get("/ui/{name}", name=UI_ROUTE_PREFIX + "file")
async def ui_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in FILES or name == "index.html":
        raise web.HTTPNotFound()
    return _serve(request, name)
